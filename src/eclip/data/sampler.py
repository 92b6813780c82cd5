"""P x K batches: P distinct products, K images each.

K distinct images where the product has them; otherwise its images repeat and the repeats are
marked for augmentation, so the intra-product objective always sees two views. The order is a
pure function of (seed, step): resuming at step s gives exactly the batches a straight run
would have drawn, with nothing to save but the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    product: int  # index into the catalog's product list
    image: int  # index into that product's images
    augment: bool  # a repeated image: draw an augmented view


def choose_images(n: int, k: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    """K (image index, augment) pairs for a product with n images: K distinct images where it
    has them, else all of them then repeats marked for augmentation. Shared with the streaming
    reader (shards.py) so both paths pick images the same way."""
    if n >= k:
        return [(i, False) for i in rng.choice(n, size=k, replace=False).tolist()]
    chosen = rng.permutation(n).tolist()
    repeats = rng.integers(0, n, size=k - n).tolist()
    return [(i, False) for i in chosen] + [(i, True) for i in repeats]


class PKSampler:
    def __init__(self, images_per_product: list[int], products_per_batch: int, images_per_product_in_batch: int, seed: int = 0):
        if products_per_batch < 1 or images_per_product_in_batch < 1:
            raise ValueError("P and K must be at least 1")
        if products_per_batch > len(images_per_product):
            raise ValueError(f"P={products_per_batch} exceeds the {len(images_per_product)} products in the catalog")
        self.counts = list(images_per_product)
        self.p = products_per_batch
        self.k = images_per_product_in_batch
        self.seed = seed
        self.batches_per_epoch = len(self.counts) // self.p
        self.step = 0

    def batch(self, step: int) -> list[Slot]:
        """The batch drawn at `step`: P x K slots, products in groups of K."""
        epoch, index = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        products = order[index * self.p : (index + 1) * self.p]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        slots = []
        for product in products.tolist():
            slots += [Slot(product, i, augment) for i, augment in choose_images(self.counts[product], self.k, rng)]
        return slots

    def __iter__(self):
        while True:
            batch = self.batch(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler seed {state['seed']} in the checkpoint differs from {self.seed}")
        self.step = int(state["step"])
