"""Where the training loop's batches come from: `source.next_batch(step)`, with a state for the
checkpoint. Two sources behind one interface: the catalog read map-style (the seeded P x K
sampler, every rank cutting its share out of the global batch) and the shard stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from eclip.data import Batch, ImageStore, PKSampler, Product, load_catalog
from eclip.data.augmentation import product_batch
from eclip.data.shards import ShardStream

from ..distributed import DistEnv
from .config import TrainConfig


class BatchSource(Protocol):
    def next_batch(self, step: int) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MapBatchSource:
    """PKSampler's slots for the step, made into a batch by `batch_for_slots(slots, step)`. Its
    state is the sampler's, so checkpoints stay what they were."""

    def __init__(self, sampler: PKSampler, batch_for_slots: Callable[[list, int], Batch], store: ImageStore | None = None):
        self.sampler = sampler
        self.batch_for_slots = batch_for_slots
        self.store = store  # the decoded images (the feature cache reads the catalog from it)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def next_batch(self, step: int) -> Batch:
        batch = self.batch_for_slots(self.sampler.batch(step), step)
        self.sampler.step = step + 1
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def rank_slice(slots: list, world_size: int, rank: int) -> tuple[list, int]:
    """This rank's contiguous share of the global batch's products (whole products, so a
    product's images and title stay together), and the share's first slot index."""
    products = list(dict.fromkeys(slot.product for slot in slots))
    if len(products) % world_size:
        raise ValueError(f"products_per_batch={len(products)} is not divisible by {world_size} ranks")
    share = len(products) // world_size
    mine = set(products[rank * share : (rank + 1) * share])
    first = next(i for i, slot in enumerate(slots) if slot.product in mine)
    return [slot for slot in slots if slot.product in mine], first


def product_groups(slots: list, world_size: int = 1, rank: int = 0) -> list[tuple[int, list, int]]:
    """This rank's products of the global batch, in order: (product, its slots, the index of
    its first slot in the global batch: what seeds its augmented views)."""
    mine, first = rank_slice(slots, world_size, rank)
    by_product: dict[int, list] = {}
    for slot in mine:
        by_product.setdefault(slot.product, []).append(slot)
    groups = []
    for product, group in by_product.items():
        groups.append((product, group, first))
        first += len(group)
    return groups


def make_batch(store: ImageStore, slots: list, seed: int, step: int, rank: int = 0, world_size: int = 1) -> Batch:
    """This rank's part of the global batch drawn at `step`; augmented views are drawn per
    product with a generator of its slot, so they do not depend on the number of ranks."""
    groups = product_groups(slots, world_size, rank)
    return product_batch(
        [([store.get(s.product, s.image) for s in group], [s.augment for s in group], product, store.products[product].title)
         for product, group, _ in groups],
        seed, step, groups[0][2],
    )


def make_batch_source(
    shards: str | list[str] | None,
    products_per_batch: int,
    images_per_product: int,
    image_size: int,
    seed: int = 0,
    *,
    products: list[Product] | None = None,
    store: ImageStore | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    mp_context: str | None = None,
) -> MapBatchSource | ShardStream:
    """With `shards` (a URL pattern, a list, or a shard folder / shards.json URL): a ShardStream
    of this rank's share of the global batch, products_per_batch / world_size products (each
    rank streams its own products). Without: the map-style source over `store` (or a new
    ImageStore of `products`), this rank's share of each global batch (make_batch)."""
    if shards:
        if products_per_batch % world_size:
            raise ValueError(f"products_per_batch={products_per_batch} is not divisible by {world_size} ranks")
        return ShardStream(
            shards, products_per_batch // world_size, images_per_product, image_size, seed, rank, world_size,
            num_workers, shuffle_buffer, mp_context=mp_context,
        )
    if store is None:
        if products is None:
            raise ValueError("the map-style source needs products or a store")
        store = ImageStore(products, image_size)
    sampler = PKSampler([len(p.images) for p in store.products], products_per_batch, images_per_product, seed)
    return MapBatchSource(sampler, lambda slots, step: make_batch(store, slots, seed, step, rank, world_size), store)


def make_data_source(config: TrainConfig, image_size: int, env: DistEnv, store: ImageStore | None = None) -> MapBatchSource | ShardStream:
    """The source of a TrainConfig: the shard stream when `config.shards` is set, else the
    catalog read map-style. Both give this rank its share of the global P x K batch."""
    common = dict(rank=env.rank, world_size=env.world_size)
    if config.shards:
        return make_batch_source(
            config.shards, config.products_per_batch, config.images_per_product, image_size, config.seed,
            num_workers=config.data_workers, shuffle_buffer=config.shuffle_buffer, **common,
        )
    products, _ = load_catalog(config.catalog)  # logs its own summary
    if store is None or store.image_size != image_size:
        store = ImageStore(products, image_size)
    return make_batch_source(None, config.products_per_batch, config.images_per_product, image_size, config.seed, store=store, **common)
