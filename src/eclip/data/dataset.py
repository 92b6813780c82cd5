"""Turns sampler slots into tensors: decoded, resized images (cached as uint8), titles and
product ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .catalog import Product
from .sampler import Slot
from .transforms import augment_view, load_rgb, normalize, to_uint8_tensor

logger = logging.getLogger("eclip.data")


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) float, normalised
    image_pids: torch.Tensor  # (B,) integer product index
    titles: list[str]  # (T,) one per product in the batch
    text_pids: torch.Tensor  # (T,)


class ImageStore:
    """Decoded images at the model's size, cached in memory as uint8 (64 px x 3 channels is
    12 KiB an image). A file that fails to decode is counted and replaced by another image of
    its product, never a crash."""

    def __init__(self, products: list[Product], image_size: int):
        self.products = products
        self.image_size = image_size
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.failed: set[tuple[int, int]] = set()

    def get(self, product: int, image: int) -> torch.Tensor:
        key = (product, image)
        if key not in self.cache:
            try:
                self.cache[key] = to_uint8_tensor(load_rgb(self.products[product].images[image].path), self.image_size)
            except Exception as error:
                if key not in self.failed:
                    self.failed.add(key)
                    logger.warning("image %s failed to decode (%s); using another image of the product", self.products[product].images[image].path, error)
                others = [i for i in range(len(self.products[product].images)) if (product, i) not in self.failed]
                if not others:
                    raise RuntimeError(f"product {self.products[product].product_id}: no image decodes") from error
                return self.get(product, others[0])
        return self.cache[key]

    def preload(self, progress: bool = True) -> None:
        keys = [(p, i) for p, product in enumerate(self.products) for i in range(len(product.images))]
        for p, i in tqdm(keys, desc="decoding images", unit="img", disable=not progress, leave=False):
            self.get(p, i)


def build_batch(
    images: list[torch.Tensor],
    augment: list[bool],
    image_pids: list[int],
    titles: list[str],
    text_pids: list[int],
    generator: torch.Generator,
) -> Batch:
    """The one place a Batch is made, for the map-style path (collate) and the shard stream
    (shards.py): uint8 (3, S, S) images, the repeats replaced by augmented views drawn in slot
    order from `generator`, then normalised."""
    views = [augment_view(image, generator) if repeat else image for image, repeat in zip(images, augment)]
    return Batch(
        images=normalize(torch.stack(views)),
        image_pids=torch.tensor(image_pids, dtype=torch.long),
        titles=list(titles),
        text_pids=torch.tensor(text_pids, dtype=torch.long),
    )


def collate(store: ImageStore, slots: list[Slot], generator: torch.Generator) -> Batch:
    product_order = list(dict.fromkeys(slot.product for slot in slots))
    return build_batch(
        [store.get(slot.product, slot.image) for slot in slots],
        [slot.augment for slot in slots],
        [slot.product for slot in slots],
        [store.products[p].title for p in product_order],
        product_order,
        generator,
    )
