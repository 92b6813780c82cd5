"""Product-grouped WebDataset shards: a writer (catalog -> `shard-000000.tar`, ... + `shards.json`)
and a streaming reader that yields the same `Batch` as the map-style path (ImageStore + PKSampler
+ collate), for catalogs too large to decode into memory or stored away from the trainer.

A sample is one product: its images as `<key>.0.jpg`, `<key>.1.png`, ... (the original file's
bytes unless the writer re-encodes) and `<key>.json`:

    {"product_id": "p1", "title": "...", "category": "...", "attributes": {...},
     "index": 17, "images": ["0.jpg", "1.png"], "boxes": [[0.1, 0.2, 0.8, 0.9], null]}

`index` is the product's position in the catalog load_catalog returned, so a streamed batch has
the same product ids as a map-style batch of the same catalog; `boxes` are fractions of the
image's width and height (as ProductImage.box), so they survive a resize to a square.

Streaming is resampled: each (rank, DataLoader worker) draws shards at random with replacement
from its own seed, so ranks and workers see different streams without any coordination, and
the stream never ends (an "epoch" is `shards.json`'s product count / P batches, a bookkeeping
unit only). Resuming does not replay the interrupted stream; it reseeds it at the step (see
ShardStream).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .catalog import Product, load_catalog
from .dataset import Batch, ImageStore, build_batch, collate
from .sampler import PKSampler, choose_images
from .transforms import to_uint8_tensor

logger = logging.getLogger("eclip.data")

INDEX_NAME = "shards.json"
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT = "eclip-shards/1"
MB = 1_000_000  # --max-size-mb counts 10^6 bytes
_MTIME = 1_700_000_000  # a fixed integer mtime: reproducible tars, and no PAX header per member (a float mtime adds one)
_IMAGE_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "tif": "tif", "tiff": "tif"}


# ----------------------------------------------------------------------------- writing


@dataclass
class ShardReport:
    out_dir: str
    shards: list[dict] = field(default_factory=list)  # {"name", "samples", "images", "bytes"}
    products: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (catalog and writing)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.products / max(self.seconds, 1e-9)
        text = f"{self.products} products, {self.images} images in {len(self.shards)} shards under {self.out_dir} ({rate:.0f} products/s)"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return text


def sample_key(product_id: str, used: set[str]) -> str:
    """A tar-safe sample key: WebDataset splits a member name at its first dot and groups by the
    part before it, so a key may not contain dots or slashes. An id that had to change gets a
    hash of the original, so distinct ids never collide; the real id is in the json."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", product_id)[:64]
    if key != product_id:
        key = f"{key}_{hashlib.sha1(product_id.encode()).hexdigest()[:10]}"
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _encode_image(path: str, image_size: int | None, quality: int) -> tuple[str, bytes]:
    """(extension, bytes): the file as it is, or squashed to image_size x image_size (as
    to_uint8_tensor does at training time) and re-encoded as JPEG."""
    if image_size is None:
        ext = Path(path).suffix.lower().lstrip(".")
        return _IMAGE_EXTENSIONS.get(ext, ext or "img"), Path(path).read_bytes()
    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    buffer = io.BytesIO()
    # 4:4:4, no chroma subsampling: at training sizes (32-224 px) 4:2:0 smears colour edges
    # (twice the pixel error at 32 px, measured on ShopSynth) and colour is a product attribute
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return "jpg", buffer.getvalue()


def _tar_size(offset: int) -> int:
    """The size of a tar closed at `offset`: two zero blocks, then padding to a whole record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardFile:
    """One shard being written under a temporary name; `commit` renames it into place, so a
    killed run never leaves a truncated `shard-*.tar` that a reader would take for a good one."""

    def __init__(self, out_dir: Path, number: int):
        self.name = SHARD_PATTERN.format(number)
        self.final = out_dir / self.name
        self.tmp = out_dir / f".{self.name}.tmp"
        self.handle = self.tmp.open("wb")
        self.tar = tarfile.open(fileobj=self.handle, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed in commit)
        self.samples = 0
        self.images = 0

    def members(self, key: str, files: list[tuple[str, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
        out = []
        for suffix, data in files:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), _MTIME, 0o444, "eclip", "eclip"
            out.append((info, data))
        return out

    def footprint(self, members: list[tuple[tarfile.TarInfo, bytes]]) -> int:
        """Bytes these members add to the tar: headers (exactly as tarfile will write them) and
        data padded to whole blocks."""
        total = 0
        for info, data in members:
            total += len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
            total += -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return total

    def would_be(self, extra: int) -> int:
        return _tar_size(self.tar.offset + extra)

    def add(self, members: list[tuple[tarfile.TarInfo, bytes]], images: int) -> None:
        for info, data in members:
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.images += images

    def commit(self) -> dict:
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.final)
        return {"name": self.name, "samples": self.samples, "images": self.images, "bytes": self.final.stat().st_size}


def write_shards(
    catalog: str | Path,
    out_dir: str | Path,
    max_count: int | None = None,
    max_size_mb: float | None = None,
    image_size: int | None = None,
    jpeg_quality: int = 90,
    seed: int = 0,
    progress: bool = False,
) -> ShardReport:
    """Shard a catalog. A shard closes before the sample that would take it past `max_count`
    samples or `max_size_mb` (the tar file's size, exact); with neither, 256 MB. A product
    larger than the size limit on its own gets a shard of its own (a warning says so).

    Products are written in an order shuffled by `seed`: catalogs are often sorted by category,
    and a resampled stream with a bounded shuffle buffer would otherwise fill whole batches
    from one category. Images that cannot be read are skipped and counted (load_catalog has
    already dropped the undecodable ones); a product left with no image is skipped."""
    products, catalog_report = load_catalog(catalog)
    return write_product_shards(products, out_dir, max_count, max_size_mb, image_size, jpeg_quality, seed, progress, source=str(catalog), skipped=catalog_report.skipped)


def write_product_shards(
    products: list[Product],
    out_dir: str | Path,
    max_count: int | None = None,
    max_size_mb: float | None = None,
    image_size: int | None = None,
    jpeg_quality: int = 90,
    seed: int = 0,
    progress: bool = False,
    source: str = "",
    skipped: Counter | None = None,
) -> ShardReport:
    """write_shards for products already loaded; `index` in each sample is the position in
    `products`."""
    from tqdm import tqdm

    if max_count is not None and max_count < 1:
        raise ValueError("max_count must be at least 1")
    if max_size_mb is not None and max_size_mb <= 0:
        raise ValueError("max_size_mb must be positive")
    if max_count is None and max_size_mb is None:
        max_size_mb = 256
    max_bytes = None if max_size_mb is None else int(max_size_mb * MB)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier sharding's index would describe shards this run is about to replace: remove it
    # first, so a run killed half-way leaves a folder without an index (refused by the reader)
    # rather than an index that lies
    (out / INDEX_NAME).unlink(missing_ok=True)
    report = ShardReport(str(out), skipped=Counter(skipped or {}))
    begin = time.time()
    used: set[str] = set()
    current: _ShardFile | None = None
    order = np.random.default_rng(seed).permutation(len(products)).tolist()
    try:
        for index in tqdm(order, desc="sharding", unit="product", disable=not progress, leave=False):
            product = products[index]
            files, boxes = [], []
            for image in product.images:
                try:
                    ext, data = _encode_image(image.path, image_size, jpeg_quality)
                except Exception as error:  # PIL and the OS raise many types; one image is not worth a crash
                    report.skipped["unreadable image"] += 1
                    logger.warning("product %s: image %s skipped (%s)", product.product_id, image.path, error)
                    continue
                files.append((f"{len(files)}.{ext}", data))
                boxes.append(None if image.box is None else list(image.box))
            if not files:
                report.skipped["no usable image"] += 1
                logger.warning("product %s: no readable image, not written", product.product_id)
                continue
            meta = {
                "product_id": product.product_id,
                "title": product.title,
                "category": product.category,
                "attributes": product.attributes,
                "index": index,
                "images": [name for name, _ in files],
                "boxes": boxes,
            }
            key = sample_key(product.product_id, used)
            payload = [*files, ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
            if current is None:
                current = _ShardFile(out, len(report.shards))
            members = current.members(key, payload)
            extra = current.footprint(members)
            full = (max_count is not None and current.samples >= max_count) or (
                max_bytes is not None and current.samples > 0 and current.would_be(extra) > max_bytes
            )
            if full:
                report.shards.append(current.commit())
                current = _ShardFile(out, len(report.shards))
                members = current.members(key, payload)
            if max_bytes is not None and current.would_be(extra) > max_bytes:
                logger.warning("product %s alone is %.2f MB, over the %.2f MB shard limit: it gets a shard of its own", product.product_id, current.would_be(extra) / MB, max_bytes / MB)
            current.add(members, len(files))
            report.products += 1
            report.images += len(files)
        if current is not None:
            report.shards.append(current.commit())
    except BaseException:
        if current is not None:  # leave no temporary file behind
            current.handle.close()
            current.tmp.unlink(missing_ok=True)
        raise
    report.seconds = time.time() - begin
    index_data = {
        "format": FORMAT,
        "source": source,
        "products": report.products,
        "images": report.images,
        "image_size": image_size,
        "seed": seed,
        "pattern": _brace_pattern(len(report.shards)),
        "shards": report.shards,
        "skipped": dict(report.skipped),
    }
    from eclip.io import atomic_write_text

    atomic_write_text(out / INDEX_NAME, json.dumps(index_data, indent=2))
    os.chmod(out / INDEX_NAME, 0o644)  # mkstemp made it private; readers may be other users
    # shards of an earlier, larger run in the same folder are not in the index: remove them so
    # a brace pattern or glob cannot pick them up
    names = {s["name"] for s in report.shards}
    for stale in out.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name not in names:
            logger.info("removing %s (not part of this sharding)", stale)
            stale.unlink()
    logger.debug(report.summary())  # callers print or log it; the CLI prints it
    return report


def _brace_pattern(count: int) -> str:
    if count <= 1:
        return SHARD_PATTERN.format(0)
    return f"shard-{{{0:06d}..{count - 1:06d}}}.tar"


# ----------------------------------------------------------------------------- opening URLs


def open_url(url: str):
    """A binary file object for a local path, `file://`, a webdataset scheme (`pipe:`, `http(s)`
    via curl, `gs`, ...) or any fsspec protocol (`memory://`, `s3://` with s3fs, ...)."""
    try:
        from webdataset.gopen import gopen, gopen_schemes
    except ImportError as error:  # an optional extra: say how to get it
        raise ImportError("reading shards needs webdataset: pip install 'eclip[scale]'") from error

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or len(scheme) == 1 or scheme in gopen_schemes:  # len 1: a Windows drive letter
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def expand_urls(urls: str | list[str]) -> list[str]:
    """A list of shard URLs from: a list; a brace pattern (`shard-{000000..000009}.tar`, several
    joined by `::`); a shard folder or a `shards.json` (the shards its index lists)."""
    if isinstance(urls, (list, tuple)):
        return [str(u) for u in urls]
    if _is_index_location(urls):
        index = read_index(urls)
        if index is None:
            raise ValueError(f"{urls}: no readable {INDEX_NAME} (give a shard pattern such as shard-{{000000..000009}}.tar instead)")
        base = _index_base(urls)
        return [f"{base}{shard['name']}" for shard in index["shards"] if shard["samples"] > 0]
    from webdataset.shardlists import expand_urls as wds_expand

    return wds_expand(urls)


def _is_index_location(url: str) -> bool:
    return url.endswith(".json") or url.endswith("/") or ("://" not in url and Path(url).is_dir())


def _index_base(url: str) -> str:
    if url.endswith(".json"):
        return url[: url.rfind("/") + 1]
    return url if url.endswith("/") else url + "/"


def read_index(location: str) -> dict | None:
    """`shards.json` from a shard folder, the index's own URL, or next to the first shard of a
    pattern; None when there is none (the stream works without it, the epoch size is unknown)."""
    if location.endswith(".json"):
        url = location
    elif _is_index_location(location):
        url = _index_base(location) + INDEX_NAME
    else:
        from webdataset.shardlists import expand_urls as wds_expand

        first = wds_expand(location)[0]
        url = first[: first.rfind("/") + 1] + INDEX_NAME
    try:
        with open_url(url) as handle:
            return json.loads(handle.read())
    except (OSError, ValueError):  # no index, or not JSON: the caller decides whether it needs one
        return None


# ----------------------------------------------------------------------------- reading


@dataclass
class ShardSample:
    key: str
    product_id: str
    title: str
    index: int
    images: list[bytes]
    boxes: list[tuple[float, float, float, float] | None]
    category: str | None = None
    attributes: dict = field(default_factory=dict)
    url: str = ""


class SampleError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _pid_from_id(product_id: str) -> int:
    # shards without `index` (written by another tool): a stable 62-bit id from the product id
    return int.from_bytes(hashlib.sha1(product_id.encode()).digest()[:8], "big") >> 2


def parse_sample(raw: dict) -> ShardSample:
    """A grouped tar sample -> ShardSample, or SampleError naming what is wrong."""
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise SampleError("missing json", f"sample {key}: no json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as error:
        raise SampleError("bad json", f"sample {key}: malformed json ({error})") from None
    if not isinstance(meta, dict):
        raise SampleError("bad json", f"sample {key}: json is not an object")
    for name in ("product_id", "title", "images"):
        if name not in meta:
            raise SampleError("missing field", f"sample {key}: missing field {name!r}")
    title, names = meta["title"], meta["images"]
    if not isinstance(title, str) or not title.strip():
        raise SampleError("missing field", f"sample {key}: empty title")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SampleError("missing field", f"sample {key}: 'images' must be a non-empty list of member names")
    boxes = meta.get("boxes") or [None] * len(names)
    images, kept_boxes = [], []
    for name, box in zip(names, boxes + [None] * (len(names) - len(boxes))):
        data = raw.get(name.lower())  # webdataset lower-cases member suffixes
        if not isinstance(data, bytes):
            raise SampleError("missing image", f"sample {key}: image member {name!r} is missing")
        images.append(data)
        kept_boxes.append(tuple(box) if isinstance(box, list) and len(box) == 4 else None)
    product_id = str(meta["product_id"])
    index = meta.get("index")
    return ShardSample(
        key=key,
        product_id=product_id,
        title=title.strip(),
        index=int(index) if isinstance(index, int) else _pid_from_id(product_id),
        images=images,
        boxes=kept_boxes,
        category=meta.get("category"),
        attributes=meta.get("attributes") or {},
        url=raw.get("__url__", ""),
    )


def iter_raw_samples(url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """The grouped samples of one shard (webdataset's tar reader); errors go to `on_error`,
    which returns True to continue. The file is closed however the iteration ends."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = open_url(url)
    except Exception as error:
        on_error(error)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
        yield from group_by_keys(files, handler=on_error)
    finally:
        stream.close()


def read_shard(url: str) -> Iterator[ShardSample]:
    """Every sample of one shard, in order (for inspection and tests; errors raise)."""

    def reraise(error: Exception) -> bool:
        raise error

    for raw in iter_raw_samples(url, reraise):
        yield parse_sample(raw)


def decode_image(data: bytes, image_size: int) -> torch.Tensor:
    """Bytes -> (3, S, S) uint8 through exactly the map-style path's conversion and resize."""
    with Image.open(io.BytesIO(data)) as image:
        return to_uint8_tensor(image.convert("RGB"), image_size)


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


def _augmentation_generator(seed: int, rank: int, step: int) -> torch.Generator:
    # a function of the step only (not of the worker), like the map-style path's views
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step, 0xA06]).generate_state(1)[0]))


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
    DataLoader returns them in); each batch's augmented views come from (seed, rank, step)."""
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
                skips.add("unreadable image", f"{sample.url}: product {sample.product_id}: image {i} does not decode ({error})")
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
        batch = build_batch(
            [image for _, views in group for image, _ in views],
            [augment for _, views in group for _, augment in views],
            [s.index for s, views in group for _ in views],
            [s.title for s, _ in group],
            [s.index for s, _ in group],
            _augmentation_generator(config.seed, config.rank, step),
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


# ----------------------------------------------------------------------------- one interface for the trainer


class BatchSource(Protocol):
    def next_batch(self, step: int) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MapBatchSource:
    """The map-style path behind the BatchSource interface: PKSampler's slots for the step, made
    into a batch by `batch_for_slots(slots, step)` (default: collate from `store` with
    `generator_for_step(step)`; the trainer passes its rank-slicing make_batch). Its state is
    the sampler's, so checkpoints stay what they were."""

    def __init__(
        self,
        sampler: PKSampler,
        batch_for_slots: Callable[[list, int], Batch] | None = None,
        store: ImageStore | None = None,
        generator_for_step: Callable[[int], torch.Generator] | None = None,
    ):
        if batch_for_slots is None:
            if store is None or generator_for_step is None:
                raise ValueError("give batch_for_slots, or store and generator_for_step")

            def batch_for_slots(slots: list, step: int) -> Batch:
                return collate(store, slots, generator_for_step(step))

        self.sampler = sampler
        self.batch_for_slots = batch_for_slots

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


def default_generator_for_step(seed: int) -> Callable[[int], torch.Generator]:
    def generator_for_step(step: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1_000_003 + step)

    return generator_for_step


def make_batch_source(
    shards: str | list[str] | None,
    products_per_batch: int,
    images_per_product: int,
    image_size: int,
    seed: int = 0,
    *,
    products: list[Product] | None = None,
    store: ImageStore | None = None,
    batch_for_slots: Callable[[list, int], Batch] | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    mp_context: str | None = None,
) -> MapBatchSource | ShardStream:
    """What the training loop draws batches from: `source.next_batch(step)`.

    With `shards` (a URL pattern, a list, or a shard folder / shards.json URL): a ShardStream
    of this rank's share of the global batch, products_per_batch / world_size products (each
    rank streams its own products, as rank_slice gives each rank its share of a map-style
    batch). Without: the map-style source over `store` (or a new ImageStore of `products`),
    batches made by `batch_for_slots` (default: collate, the whole batch on one process)."""
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
    if batch_for_slots is None:
        return MapBatchSource(sampler, store=store, generator_for_step=default_generator_for_step(seed))
    return MapBatchSource(sampler, batch_for_slots)
