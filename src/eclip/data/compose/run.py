"""Composing a catalog: products split over worker processes and over ranks (machines), each
product's scenes drawn from their own random streams, so the output does not depend on either."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..catalog import Product
from ..transforms import open_image
from .backgrounds import PHOTO_BACKGROUNDS
from .cutout import CutOutCache, cut_out_mask
from .scene import ComposeConfig, _box, render_scene, scene_config

logger = logging.getLogger("eclip.data")

PERSON_SKIN = 0.04  # a cut-out with this share of skin-tone pixels shows a person
PART = re.compile(r"catalog\.part-(\d{5})-of-(\d{5})\.jsonl")


@dataclass
class ComposeResult:
    catalog: Path  # this rank's catalog (a part when world_size > 1)
    products: int
    scenes: int
    seconds: float
    fallback_distractors: int  # products with no other category: distractors of any other product
    empty_masks: int  # photos whose cut-out failed (pasted whole, as an opaque rectangle)
    unreadable: int = 0  # products skipped: their photo does not decode
    workers: int = 1
    cut_outs: int = 0  # photos cut out, over all workers (a photo cut again after eviction counts again)
    merged: Path | None = None  # the whole catalog, written by the rank that finished last

    @property
    def scenes_per_second(self) -> float:
        return self.scenes / self.seconds if self.seconds > 0 else float("inf")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share(count: int, rank: int, world_size: int) -> range:
    """The products of one rank: a contiguous block, so the parts concatenate in rank order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def part_name(rank: int, world_size: int) -> str:
    return f"catalog.part-{rank:05d}-of-{world_size:05d}.jsonl"


def cut_side(config: ComposeConfig) -> int:
    """Nothing is pasted larger than max(product_scale) of the scene: photos are cut out at that size."""
    return math.ceil(max(config.product_scale) * config.size)


def _safe_name(product_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", product_id)[:80]


def _clean_entry(path: str) -> dict:
    """The clean photo, by absolute path, with the box of its cut-out in its own pixels."""
    with open_image(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    mask = cut_out_mask(rgb)
    box = _box(mask) if mask.sum() >= 0.01 * mask.size else None
    return {"path": str(Path(path).resolve()), "box": box or [0, 0, rgb.shape[1], rgb.shape[0]]}


@dataclass
class _Chunk:
    """What one worker returns for a block of products."""
    records: list[str] = field(default_factory=list)
    scenes: int = 0
    fallback: int = 0
    unreadable: set[int] = field(default_factory=set)
    empty: set[str] = field(default_factory=set)
    cut_outs: int = 0


class _Composer:
    """One worker's state: the catalog, its distractor pools and a cut-out cache."""

    def __init__(self, products: list[Product], out: Path, config: ComposeConfig, cache_items: int | None, cache_bytes: int | None, disk: Path | None):
        self.products, self.out, self.config = products, out, config
        self.cache = CutOutCache(cut_side(config), cache_items, cache_bytes, disk)
        # distractors are drawn uniformly over the products of the other (known) categories: a
        # second t-shirt in a t-shirt's scene would make the title ambiguous
        by_category: dict[str, list[int]] = {}
        for i, p in enumerate(products):
            if p.category is not None:
                by_category.setdefault(p.category, []).append(i)
        known = sorted(i for members in by_category.values() for i in members)
        self.others: dict[str, list[int]] = {}
        for category, members in by_category.items():
            mine = set(members)
            self.others[category] = [i for i in known if i not in mine]
        self.unreadable: set[int] = set()

    def _other(self, rng: random.Random, index: int, pool: list[int]) -> int | None:
        if pool:
            return rng.choice(pool)
        if len(self.products) < 2:
            return None
        other = rng.randrange(len(self.products) - 1)
        return other + 1 if other >= index else other  # skip the product itself

    def _cut(self, other: int | None):
        """The cut-out of product `other`, or None when it has no readable photo."""
        if other is None or other in self.unreadable:
            return None
        try:
            return self.cache.get(self.products[other].images[0].path)
        except Exception:
            self.unreadable.add(other)  # reported when its own turn comes
            return None

    def _person(self, rng: random.Random, index: int, pool: list[int]) -> int | None:
        """A product whose photo shows a person (of a few drawn), for the people distractor."""
        for _ in range(12):
            other = self._other(rng, index, pool)
            if self._cut(other) is not None and self.cache.skin_fraction(self.products[other].images[0].path) >= PERSON_SKIN:
                return other
        return None

    def _photo(self, rng: np.random.Generator) -> np.ndarray:
        """A random catalog photo, whole (for the photo backdrops); an unreadable one is skipped."""
        for _ in range(8):
            path = self.products[int(rng.integers(len(self.products)))].images[0].path
            try:
                with open_image(path) as image:
                    image.draft("RGB", (self.config.size, self.config.size))  # JPEG: decode at 1/2..1/8
                    return np.asarray(image.convert("RGB"))
            except Exception:
                continue
        return np.full((8, 8, 3), 128, np.uint8)

    def compose(self, indices: range) -> _Chunk:
        config, out, chunk = self.config, self.out, _Chunk()
        cuts_before = self.cache.cuts
        for index in indices:
            product = self.products[index]
            # a product without a category, or a catalog of one category, falls back to any other product
            pool = self.others.get(product.category) or []
            if not pool:
                chunk.fallback += 1
            try:
                cut = self.cache.get(product.images[0].path)
            except Exception as error:  # PIL raises many types for broken files; one must not end the run
                logger.warning("product %s: photo %s unreadable (%s); skipped", product.product_id, product.images[0].path, error)
                self.unreadable.add(index)
                chunk.unreadable.add(index)
                continue
            images = []
            for k in range(config.scenes_per_product):
                rng = random.Random(f"{config.seed}-{product.product_id}-{k}")
                scene_cfg = scene_config(config, rng)
                picks, pick_ids = [], []
                for _ in range(rng.randint(*scene_cfg.distractors)):
                    other = self._other(rng, index, pool)
                    pick = self._cut(other)
                    if pick is not None:
                        picks.append(pick)
                        pick_ids.append(self.products[other].product_id)
                if scene_cfg.people_probability > 0 and rng.random() < scene_cfg.people_probability:
                    person = self._person(rng, index, pool)
                    if person is not None:  # behind the others: the occluder is the last one
                        picks.insert(0, self._cut(person))
                        pick_ids.insert(0, self.products[person].product_id)
                photos = self._photo if any(k in PHOTO_BACKGROUNDS for k in scene_cfg.backgrounds) else None
                scene, boxes = render_scene(cut, picks, rng, scene_cfg, photos)
                name = f"images/{index:06d}_{_safe_name(product.product_id)}_{k}.jpg"
                scene.save(out / name, quality=config.quality)
                # the distractors' ids: which products compete with this one (load_catalog ignores
                # them, and the regime and area: an evaluation groups scenes by them)
                images.append({"path": name, **boxes, "regime": scene_cfg.regime, "distractors": pick_ids})
                chunk.scenes += 1
            if config.keep_clean:
                images.append(_clean_entry(product.images[0].path))
            record = {"product_id": product.product_id, "title": product.title, "images": images}
            if product.category is not None:
                record["category"] = product.category
            if product.attributes:
                record["attributes"] = product.attributes
            chunk.records.append(json.dumps(record, ensure_ascii=False) + "\n")
        chunk.empty = set(self.cache.empty)
        chunk.cut_outs = self.cache.cuts - cuts_before
        return chunk


_worker: _Composer | None = None  # a worker process's composer, made once by _start


def _start(*args) -> None:
    global _worker
    _worker = _Composer(*args)


def _compose_chunk(indices: range) -> _Chunk:
    return _worker.compose(indices)


def compose_catalog(
    products: list[Product],
    out_dir: str | Path,
    config: ComposeConfig | None = None,
    progress: bool = True,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    cache_mb: float | None = 1024,
    cache_items: int | None = None,
    cutout_dir: str | Path | None = None,
    share_cutouts: bool | None = None,
) -> ComposeResult:
    """Write `images/` and `catalog.jsonl` (each product with its K scenes, boxes in pixels)
    under out_dir. With keep_clean each product's last image is its clean photo.

    `workers` processes share the products of this rank; with world_size > 1 the rank composes
    its block of products (distractors come from all of them) into catalog.part-R-of-W.jsonl,
    and the rank that finds every part written merges them into catalog.jsonl. The output is the
    same for any workers, ranks and world size. `cache_mb` bounds all workers' cut-out caches
    together (`cache_items` bounds each one's count). With share_cutouts (default: with more than
    one worker or rank) each photo is cut out once and saved as PNG under `cutout_dir` (default:
    out_dir/.cutouts-<side>, removed once the whole catalog is written), where every worker and
    every rank that shares it reads it back; one process alone keeps them in memory only."""
    from tqdm import tqdm

    config = config or ComposeConfig()
    config.validate()
    if workers < 1:
        raise ValueError(f"workers ({workers}) must be >= 1")
    mine = share(len(products), rank, world_size)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, len(mine)))
    if share_cutouts is None:
        share_cutouts = workers > 1 or world_size > 1
    cache_bytes = None if cache_mb is None else int(cache_mb * (1 << 20) / workers)
    own_dir = share_cutouts and cutout_dir is None
    disk = None if not share_cutouts else Path(cutout_dir) if cutout_dir is not None else out / f".cutouts-{cut_side(config)}"
    args = (products, out, config, cache_items, cache_bytes, disk)
    # blocks small enough to balance the workers, large enough to keep each one's cache warm
    step = max(1, min(64, math.ceil(len(mine) / (workers * 4))))
    blocks = [range(i, min(i + step, mine.stop)) for i in range(mine.start, mine.stop, step)]

    catalog = out / ("catalog.jsonl" if world_size == 1 else part_name(rank, world_size))
    tmp = catalog.with_name(f"{catalog.name}.{rank}.{os.getpid()}.tmp")
    started = time.perf_counter()
    total = _Chunk()
    bar = tqdm(total=len(mine), desc="composing", unit="product", disable=not progress, leave=False)
    if workers == 1:
        composer = _Composer(*args)
        chunks = map(composer.compose, blocks)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, initializer=_start, initargs=args)
        chunks = pool.map(_compose_chunk, blocks)
    try:
        with tmp.open("w", encoding="utf-8") as file:  # records stream out in product order
            for block, chunk in zip(blocks, chunks):
                file.writelines(chunk.records)
                total.scenes += chunk.scenes
                total.fallback += chunk.fallback
                total.unreadable |= chunk.unreadable
                total.empty |= chunk.empty
                total.cut_outs += chunk.cut_outs
                bar.update(len(block))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    tmp.replace(catalog)
    seconds = time.perf_counter() - started
    if total.fallback:
        logger.warning("%d products have no product of another category; their distractors are any other product", total.fallback)

    (out / "compose.json").write_text(json.dumps(asdict(config), indent=2))
    merged = catalog if world_size == 1 else merge_parts(out, world_size, missing_ok=True)
    if merged is not None and own_dir:
        shutil.rmtree(disk, ignore_errors=True)  # every rank is done with it
    return ComposeResult(catalog, len(mine) - len(total.unreadable), total.scenes, seconds, total.fallback,
                         len(total.empty), len(total.unreadable), workers, total.cut_outs, merged)


def merge_parts(out_dir: str | Path, world_size: int | None = None, missing_ok: bool = False) -> Path | None:
    """Concatenate catalog.part-R-of-W.jsonl in rank order into catalog.jsonl (what one machine
    would have written). A missing part is an error, or None with missing_ok (some rank is not
    done yet: the last one merges)."""
    out = Path(out_dir)
    found: dict[int, set[int]] = {}
    for path in out.glob("catalog.part-*-of-*.jsonl"):
        match = PART.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if world_size is None:
        if len(found) != 1:
            raise ValueError(f"{out}: expected catalog parts of one world size, found {sorted(found) or 'none'}")
        world_size = next(iter(found))
    missing = sorted(set(range(world_size)) - found.get(world_size, set()))
    if missing:
        if missing_ok:
            return None
        raise ValueError(f"{out}: catalog parts of ranks {missing} (of world size {world_size}) are missing")
    catalog = out / "catalog.jsonl"
    tmp = catalog.with_name(f"{catalog.name}.merge.{os.getpid()}.tmp")  # ranks merging at once do not collide
    with tmp.open("wb") as file:
        for r in range(world_size):
            with (out / part_name(r, world_size)).open("rb") as part:
                shutil.copyfileobj(part, file)
    tmp.replace(catalog)
    return catalog
