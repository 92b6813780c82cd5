"""The endless, resampled stream of P x K batches from shards, for one rank (see ShardStream)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..augmentation import product_batch
from ..dataset import Batch
from ..sampler import choose_images
from ..transforms import ImageTooLarge
from .read import (
    SampleError,
    ShardSample,
    decode_image,
    expand_urls,
    iter_raw_samples,
    parse_sample,
    read_index,
)

logger = logging.getLogger("eclip.data")


@dataclass(frozen=True)
class StreamConfig:
    urls: tuple[str, ...]
    products_per_batch: int
    images_per_product: int
    image_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1000
    start_step: int = 0
    max_empty_shards: int = 20  # this many shards in a row without a usable sample: give up
    max_unusable_products: int = 1000  # this many products in a row with no decodable image: give up


def _seeds(config: StreamConfig, worker: int) -> list[np.random.Generator]:
    sequence = np.random.SeedSequence([config.seed, config.rank, worker, config.start_step, 0x5EED])
    return [np.random.default_rng(s) for s in sequence.spawn(3)]


class _Skips:
    """Counts of skipped samples by reason; logs the first few of each reason in full."""

    LOG_FIRST = 10

    def __init__(self):
        self.total: Counter = Counter()
        self.delta: Counter = Counter()

    def add(self, reason: str, detail: str) -> None:
        self.total[reason] += 1
        self.delta[reason] += 1
        if self.total[reason] <= self.LOG_FIRST:
            logger.warning("shard stream: %s (skipped)", detail)
        elif self.total[reason] == self.LOG_FIRST + 1:
            logger.warning("shard stream: more %r problems; counting them silently", reason)

    def take(self) -> dict:
        delta, self.delta = dict(self.delta), Counter()
        return delta


def generate_batches(config: StreamConfig, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[Batch, dict]]:
    """The batches of one (rank, worker) stream, each with the skip counts since the previous
    batch (so a DataLoader's worker processes can report them to the main process).

    Worker w of n makes the global batches start_step + w, start_step + w + n, ... (the order a
    DataLoader returns them in); each batch's augmented views are seeded by (seed, step, the
    products' slots in the global batch), as the map-style path's (eclip.data.augmentation)."""
    if not config.urls:
        raise ValueError("no shard URLs")
    shard_rng, shuffle_rng, pick_rng = _seeds(config, worker)
    skips = _Skips()

    def on_tar_error(error: Exception) -> bool:
        skips.add("tar error", f"{type(error).__name__}: {error}")
        return True  # next member, or next shard: never stop the stream

    def samples() -> Iterator[ShardSample]:
        empty = 0
        while True:
            url = config.urls[int(shard_rng.integers(len(config.urls)))]
            good = 0
            for raw in iter_raw_samples(url, on_tar_error):
                try:
                    sample = parse_sample(raw)
                except SampleError as error:
                    skips.add(error.reason, f"{url}: {error}")
                    continue
                good += 1
                yield sample
            empty = 0 if good else empty + 1
            if empty >= config.max_empty_shards:
                raise RuntimeError(f"{empty} shards in a row without a usable sample (last: {url}); skipped so far: {dict(skips.total)}")

    def shuffled(items: Iterator[ShardSample]) -> Iterator[ShardSample]:
        # a reservoir: the stream itself is infinite, so the buffer is never drained
        if config.shuffle_buffer <= 1:
            yield from items
            return
        buffer: list[ShardSample] = []
        for item in items:
            if len(buffer) < config.shuffle_buffer:
                buffer.append(item)
                continue
            i = int(shuffle_rng.integers(len(buffer)))
            buffer[i], item = item, buffer[i]
            yield item

    def prepared(sample: ShardSample) -> list[tuple[torch.Tensor, bool]] | None:
        """K (uint8 image, augment) for the product, choosing as PKSampler does; an image that
        does not decode is dropped (and counted) and the choice made again from the rest."""
        images = list(sample.images)
        while images:
            picks = choose_images(len(images), config.images_per_product, pick_rng)
            decoded: dict[int, torch.Tensor] = {}
            try:
                for i, _ in picks:
                    if i not in decoded:
                        decoded[i] = decode_image(images[i], config.image_size)
            except Exception as error:  # PIL raises many types for broken files
                skips.add("image too large" if isinstance(error, ImageTooLarge) else "unreadable image", f"{sample.url}: product {sample.product_id}: image {i} does not decode ({error})")
                images.pop(i)
                continue
            return [(decoded[i], augment) for i, augment in picks]
        skips.add("no usable image", f"{sample.url}: product {sample.product_id}: no image decodes")
        return None

    step = config.start_step + worker
    unusable = 0
    group: list[tuple[ShardSample, list[tuple[torch.Tensor, bool]]]] = []
    for sample in shuffled(samples()):
        if any(sample.index == other.index for other, _ in group):
            # resampling can put two copies of a product in the buffer; a batch needs P distinct
            # products, and dropping a copy does not bias anything
            continue
        views = prepared(sample)
        if views is None:
            unusable += 1
            if unusable >= config.max_unusable_products:
                raise RuntimeError(f"{unusable} products in a row without a decodable image; skipped so far: {dict(skips.total)}")
            continue
        unusable = 0
        group.append((sample, views))
        if len(group) < config.products_per_batch:
            continue
        # views seeded by the products' slots in the global batch, as the map-style path's
        batch = product_batch(
            [([image for image, _ in views], [augment for _, augment in views], s.index, s.title) for s, views in group],
            config.seed, step, config.rank * config.products_per_batch * config.images_per_product,
        )
        yield batch, skips.take()
        group = []
        step += num_workers


class _StreamDataset(torch.utils.data.IterableDataset):
    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = config

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return generate_batches(self.config, worker, workers)


class ShardStream:
    """An endless stream of P x K `Batch`es from shards, for one rank.

    `next_batch(step)` is the trainer's entry point: it returns the batch for `step`, and when
    `step` is not the one after the last batch (a resume, or a first call at step > 0) it
    reseeds the stream at `step`.

    What a resume guarantees: the batches from step s on are a pure function of (shard list,
    seed, rank, num_workers, s) and of the shards' contents; two runs resumed at s draw the same
    batches. It does NOT reproduce the batches an uninterrupted run would have drawn after s
    (that would need the shuffle buffer and every worker's position in its tar); the
    continuation is a fresh, equally distributed draw: shards are sampled with replacement, so
    nothing is "used up" by the interrupted part. `state_dict()` holds the step and the seed;
    the step alone is enough when the caller keeps it (as the trainer's checkpoint does).
    """

    def __init__(
        self,
        urls: str | list[str],
        products_per_batch: int,
        images_per_product: int,
        image_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        prefetch_factor: int = 2,
        mp_context: str | None = None,
    ):
        if products_per_batch < 1 or images_per_product < 1:
            raise ValueError("P and K must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.source = urls if isinstance(urls, str) else ""
        self.urls = tuple(expand_urls(urls))
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.index = read_index(urls) if isinstance(urls, str) else None
        self.products_per_batch = products_per_batch
        self.images_per_product = images_per_product
        self.image_size = image_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.prefetch_factor = prefetch_factor
        self.mp_context = mp_context  # DataLoader multiprocessing_context: None (fork on Linux), "spawn", "forkserver"
        self.step = 0  # the step of the next batch
        self.skipped: Counter = Counter()  # reason -> samples or images skipped, all workers
        self._iterator: Iterator[tuple[Batch, dict]] | None = None

    @property
    def products(self) -> int | None:
        """Products in the shards (from shards.json), None without an index."""
        return None if self.index is None else int(self.index["products"])

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches that make one pass's worth of products for this rank (world_size ranks each
        draw products_per_batch products a step)."""
        if self.products is None:
            return None
        return max(1, self.products // (self.products_per_batch * self.world_size))

    def _config(self, start_step: int) -> StreamConfig:
        return StreamConfig(
            urls=self.urls,
            products_per_batch=self.products_per_batch,
            images_per_product=self.images_per_product,
            image_size=self.image_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=self.shuffle_buffer,
            start_step=start_step,
        )

    def _start(self, step: int) -> None:
        self.close()
        config = self._config(step)
        if self.num_workers == 0:
            self._iterator = generate_batches(config)
        else:
            loader = torch.utils.data.DataLoader(
                _StreamDataset(config),
                batch_size=None,  # the workers make whole batches
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.mp_context,
            )
            self._iterator = iter(loader)
        self.step = step

    def next_batch(self, step: int | None = None) -> Batch:
        """The batch for `step` (default: the next one)."""
        if step is None:
            step = self.step
        if self._iterator is None or step != self.step:
            self._start(step)
        batch, skipped = next(self._iterator)
        self.skipped.update(skipped)
        self.step = step + 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Stop the workers (a DataLoader iterator shuts them down when dropped)."""
        self._iterator = None

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_workers": self.num_workers, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"stream seed {state['seed']} in the checkpoint differs from {self.seed}")
        for name in ("num_workers", "world_size"):
            if name in state and state[name] != getattr(self, name):
                logger.warning("resuming with %s=%s (checkpoint: %s): a valid continuation, but not the one a resume with %s would draw", name, getattr(self, name), state[name], state[name])
        self.close()
        self.step = int(state["step"])

