"""Which random numbers draw a batch's augmented views (the repeats of a product with fewer than
K images): a function of (seed, step, the product's first slot in the global P x K batch), so a
resumed run, the same run on another number of ranks, and the map-style and streamed paths all
seed the same way."""

from __future__ import annotations

import torch

from .dataset import Batch, build_batch


def augmentation_seed(seed: int, step: int, slot: int = 0) -> int:
    return seed * 1_000_003 + step * 7_919 + slot


def augmentation_generator(seed: int, step: int, slot: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(augmentation_seed(seed, step, slot))


def product_batch(
    products: list[tuple[list[torch.Tensor], list[bool], int, str]],
    seed: int,
    step: int,
    first_slot: int = 0,
) -> Batch:
    """A Batch of whole products, each given as (uint8 images, augment flags, product id, title);
    each product's views come from the generator of its own first slot (`first_slot` is the
    first product's), so a product's views do not depend on which rank makes it."""
    parts, slot = [], first_slot
    for images, augment, pid, title in products:
        parts.append(build_batch(images, augment, [pid] * len(images), [title], [pid], augmentation_generator(seed, step, slot)))
        slot += len(images)
    return Batch(
        images=torch.cat([b.images for b in parts]),
        image_pids=torch.cat([b.image_pids for b in parts]),
        titles=[t for b in parts for t in b.titles],
        text_pids=torch.cat([b.text_pids for b in parts]),
    )
