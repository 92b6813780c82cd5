"""Writing shards: a catalog's products, in an order shuffled by the seed, packed into tars of at
most N samples or M bytes, and the `shards.json` index.

Encoding (reading each image and, with `image_size`, re-encoding it) is the costly part:
`workers` processes encode products in order while this process packs them, so the shards are
byte for byte those of one worker. Ranks (`rank` / `world_size`, or torchrun's environment in
the CLI) each encode a contiguous share of the shuffled order into a part (`.parts/` in the
output folder); the rank that completes the set packs the parts, in order, into the shards and
writes the index (`merge_shards` does it by hand): the same bytes again, since packing needs
only the encoded samples in order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from ...atomic import atomic_write_text
from ..catalog import Product, load_catalog
from ..transforms import ImageTooLarge, open_image
from .read import FORMAT, INDEX_NAME, SHARD_PATTERN

logger = logging.getLogger("eclip.data")

MB = 1_000_000  # --max-size-mb counts 10^6 bytes
_MTIME = 1_700_000_000  # a fixed integer mtime: reproducible tars, and no PAX header per member (a float mtime adds one)
_IMAGE_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "tif": "tif", "tiff": "tif"}


@dataclass
class ShardReport:
    out_dir: str
    shards: list[dict] = field(default_factory=list)  # {"name", "samples", "images", "bytes"}
    products: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (catalog and writing)
    seconds: float = 0.0
    part: str = ""  # a rank's part that did not complete the set: what it wrote and what is missing

    def summary(self) -> str:
        rate = self.products / max(self.seconds, 1e-9)
        where = self.part or f"in {len(self.shards)} shards under {self.out_dir}"
        text = f"{self.products} products, {self.images} images {where} ({rate:.0f} products/s)"
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
    with open_image(path) as image:
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

    def __init__(self, out_dir: Path, name: str):
        self.name = name
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

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)



# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedProduct:
    """One product ready to pack: its tar members in order (images, then the json), or none when
    no image could be read; `problems` are (skip reason, log message)."""

    product_id: str
    files: list[tuple[str, bytes]]
    images: int
    problems: list[tuple[str, str]]


def encode_product(index: int, product: Product, image_size: int | None, quality: int) -> EncodedProduct:
    files, boxes, problems = [], [], []
    for image in product.images:
        try:
            ext, data = _encode_image(image.path, image_size, quality)
        except Exception as error:  # PIL and the OS raise many types; one image is not worth a crash
            problems.append(("image too large" if isinstance(error, ImageTooLarge) else "unreadable image", f"product {product.product_id}: image {image.path} skipped ({error})"))
            continue
        files.append((f"{len(files)}.{ext}", data))
        boxes.append(None if image.box is None else list(image.box))
    if not files:
        problems.append(("no usable image", f"product {product.product_id}: no readable image, not written"))
        return EncodedProduct(product.product_id, [], 0, problems)
    meta = {
        "product_id": product.product_id,
        "title": product.title,
        "category": product.category,
        "attributes": product.attributes,
        "index": index,
        "images": [name for name, _ in files],
        "boxes": boxes,
    }
    payload = [*files, ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
    return EncodedProduct(product.product_id, payload, len(files), problems)


def _encode_chunk(tasks: list[tuple[int, Product, int | None, int]]) -> list[EncodedProduct]:
    return [encode_product(*task) for task in tasks]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def encoded_products(
    products: list[Product], positions: list[int], image_size: int | None, quality: int, workers: int = 1
) -> Iterator[EncodedProduct]:
    """The products at `positions`, encoded, in that order; with workers > 1 encoded by a pool of
    processes, a bounded number of chunks ahead (memory stays flat when packing is slower)."""
    tasks = ((i, products[i], image_size, quality) for i in positions)
    if workers <= 1:
        for task in tasks:
            yield encode_product(*task)
        return
    chunks = _chunks(tasks, 8)
    # fork: the workers need nothing but PIL, and start in milliseconds (spawn re-imports torch)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers) as pool:
        pending = deque(pool.apply_async(_encode_chunk, (chunk,)) for chunk in islice(chunks, 4 * workers))
        while pending:
            done = pending.popleft().get()
            following = next(chunks, None)
            if following is not None:
                pending.append(pool.apply_async(_encode_chunk, (following,)))
            yield from done


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------- packing


class _Packer:
    """Encoded samples -> shard-000000.tar, ... in order. A shard closes before the sample that
    would take it past `max_count` samples or `max_bytes` (the tar file's size, exact)."""

    def __init__(self, out: Path, max_count: int | None, max_bytes: int | None):
        self.out, self.max_count, self.max_bytes = out, max_count, max_bytes
        self.used: set[str] = set()
        self.current: _ShardFile | None = None
        self.shards: list[dict] = []

    def _open(self) -> _ShardFile:
        return _ShardFile(self.out, SHARD_PATTERN.format(len(self.shards)))

    def add(self, product_id: str, payload: list[tuple[str, bytes]], images: int) -> None:
        key = sample_key(product_id, self.used)
        if self.current is None:
            self.current = self._open()
        members = self.current.members(key, payload)
        extra = self.current.footprint(members)
        full = (self.max_count is not None and self.current.samples >= self.max_count) or (
            self.max_bytes is not None and self.current.samples > 0 and self.current.would_be(extra) > self.max_bytes
        )
        if full:
            self.shards.append(self.current.commit())
            self.current = self._open()
            members = self.current.members(key, payload)
        if self.max_bytes is not None and self.current.would_be(extra) > self.max_bytes:
            logger.warning("product %s alone is %.2f MB, over the %.2f MB shard limit: it gets a shard of its own", product_id, self.current.would_be(extra) / MB, self.max_bytes / MB)
        self.current.add(members, images)

    def finish(self) -> list[dict]:
        if self.current is not None:
            self.shards.append(self.current.commit())
            self.current = None
        return self.shards

    def abort(self) -> None:
        """Leave no temporary file behind."""
        if self.current is not None:
            self.current.abort()
            self.current = None


def _limits(max_count: int | None, max_size_mb: float | None) -> tuple[int | None, int | None]:
    if max_count is not None and max_count < 1:
        raise ValueError("max_count must be at least 1")
    if max_size_mb is not None and max_size_mb <= 0:
        raise ValueError("max_size_mb must be positive")
    if max_count is None and max_size_mb is None:
        max_size_mb = 256
    return max_count, None if max_size_mb is None else int(max_size_mb * MB)


def _pack(out: Path, samples: Iterable[EncodedProduct], max_count: int | None, max_bytes: int | None, report: ShardReport, progress: bool, total: int) -> None:
    """Pack every sample (logging and counting the problems of each) into the report's shards.
    An earlier sharding's index would describe shards this is about to replace: it goes first,
    so a run killed half-way leaves a folder without an index (refused by the reader) rather
    than an index that lies."""
    from tqdm import tqdm

    (out / INDEX_NAME).unlink(missing_ok=True)
    packer = _Packer(out, max_count, max_bytes)
    try:
        for sample in tqdm(samples, total=total, desc="sharding", unit="product", disable=not progress, leave=False):
            for reason, message in sample.problems:
                report.skipped[reason] += 1
                logger.warning(message)
            if not sample.files:
                continue
            packer.add(sample.product_id, sample.files, sample.images)
            report.products += 1
            report.images += sample.images
        report.shards = packer.finish()
    except BaseException:
        packer.abort()
        raise


def _write_index(out: Path, report: ShardReport, source: str, image_size: int | None, seed: int) -> None:
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
    atomic_write_text(out / INDEX_NAME, json.dumps(index_data, indent=2))
    os.chmod(out / INDEX_NAME, 0o644)  # mkstemp made it private; readers may be other users
    # shards of an earlier, larger run in the same folder are not in the index: remove them so
    # a brace pattern or glob cannot pick them up
    names = {s["name"] for s in report.shards}
    for stale in out.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name not in names:
            logger.info("removing %s (not part of this sharding)", stale)
            stale.unlink()


def _brace_pattern(count: int) -> str:
    if count <= 1:
        return SHARD_PATTERN.format(0)
    return f"shard-{{{0:06d}..{count - 1:06d}}}.tar"


# ----------------------------------------------------------------------------- writing


def write_shards(
    catalog: str | Path,
    out_dir: str | Path,
    max_count: int | None = None,
    max_size_mb: float | None = None,
    image_size: int | None = None,
    jpeg_quality: int = 90,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = 1,
    rank: int = 0,
    world_size: int = 1,
) -> ShardReport:
    """Shard a catalog. A shard closes before the sample that would take it past `max_count`
    samples or `max_size_mb` (the tar file's size, exact); with neither, 256 MB. A product
    larger than the size limit on its own gets a shard of its own (a warning says so).

    Products are written in an order shuffled by `seed`: catalogs are often sorted by category,
    and a resampled stream with a bounded shuffle buffer would otherwise fill whole batches
    from one category. Images that cannot be read are skipped and counted (load_catalog has
    already dropped the undecodable ones); a product left with no image is skipped.

    `workers` encoding processes (None: one per core) and `rank` of `world_size` (each rank its
    share, see the module's docstring) change the speed, never the output."""
    products, catalog_report = load_catalog(catalog)
    return write_product_shards(products, out_dir, max_count, max_size_mb, image_size, jpeg_quality, seed, progress,
                                source=str(catalog), skipped=catalog_report.skipped, workers=workers, rank=rank, world_size=world_size)


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
    workers: int | None = 1,
    rank: int = 0,
    world_size: int = 1,
) -> ShardReport:
    """write_shards for products already loaded; `index` in each sample is the position in
    `products`."""
    max_count, max_bytes = _limits(max_count, max_size_mb)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    workers = default_workers() if workers is None else max(1, workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.time()
    order = np.random.default_rng(seed).permutation(len(products)).tolist()
    if world_size > 1:
        settings = {"source": source, "seed": seed, "image_size": image_size, "jpeg_quality": jpeg_quality,
                    "max_count": max_count, "max_size_mb": max_size_mb}
        share = order[rank * len(order) // world_size : (rank + 1) * len(order) // world_size]
        samples = encoded_products(products, share, image_size, jpeg_quality, workers)
        return _write_part(out, samples, len(share), products, settings, Counter(skipped or {}), rank, world_size, progress, begin)
    report = ShardReport(str(out), skipped=Counter(skipped or {}))
    samples = encoded_products(products, order, image_size, jpeg_quality, workers)
    _pack(out, samples, max_count, max_bytes, report, progress, len(order))
    report.seconds = time.time() - begin
    _write_index(out, report, source, image_size, seed)
    logger.debug(report.summary())  # callers print or log it; the CLI prints it
    return report


# ----------------------------------------------------------------------------- ranks: parts, then a merge

PARTS_DIR = ".parts"
PART_FORMAT = "eclip-shard-part/1"


def _fingerprint(products: list[Product], settings: dict, world_size: int) -> str:
    """Which sharding a part belongs to: the products, the settings and the number of ranks."""
    digest = hashlib.sha1(json.dumps([settings, world_size]).encode())
    for product in products:
        digest.update(product.product_id.encode() + b"\0")
    return digest.hexdigest()[:16]


def _part_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _write_part(out: Path, samples: Iterator[EncodedProduct], total: int, products: list[Product], settings: dict,
                catalog_skipped: Counter, rank: int, world_size: int, progress: bool, begin: float) -> ShardReport:
    """One rank's share, encoded and in order, as `.parts/rank-R-of-W.tar` (+ its `.json`); then,
    when every rank's part is there, the merge (by whichever rank completes the set)."""
    from tqdm import tqdm

    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    name = _part_name(rank, world_size)
    (parts / f"{name}.json").unlink(missing_ok=True)
    report = ShardReport(str(out))
    tar = _ShardFile(parts, f"{name}.tar")
    try:
        for sample in tqdm(samples, total=total, desc=f"sharding (rank {rank})", unit="product", disable=not progress, leave=False):
            for reason, message in sample.problems:
                report.skipped[reason] += 1
                logger.warning(message)
            if not sample.files:
                continue
            # the key only keeps samples apart in the part; the merge gives the final ones
            tar.add(tar.members(f"{report.products:09d}", sample.files), sample.images)
            report.products += 1
            report.images += sample.images
        tar.commit()
    except BaseException:
        tar.abort()
        raise
    fingerprint = _fingerprint(products, settings, world_size)
    part = {"format": PART_FORMAT, "fingerprint": fingerprint, "rank": rank, "world_size": world_size, **settings,
            "products": report.products, "images": report.images,
            "catalog_skipped": dict(catalog_skipped), "skipped": dict(report.skipped)}
    atomic_write_text(parts / f"{name}.json", json.dumps(part, indent=2))  # last: the part is complete
    present = _complete_parts(parts, fingerprint, world_size)
    if len(present) == world_size and _claim(parts / f"merge-{fingerprint}.lock"):
        return merge_shards(out, progress=progress)
    report.seconds = time.time() - begin
    report.part = (f"in part {rank} of {world_size} under {parts} ({len(present)} of {world_size} parts done; the rank "
                   f"that completes the set merges them, or run `eclip shard --merge --out {out}`)")
    return report


def _read_parts(parts: Path) -> list[dict]:
    found = []
    for path in sorted(parts.glob("rank-*-of-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{path}: not a part index ({error})") from None
        if data.get("format") != PART_FORMAT:
            raise ValueError(f"{path}: not a part index (format {data.get('format')!r})")
        found.append(data)
    return found


def _complete_parts(parts: Path, fingerprint: str, world_size: int) -> list[dict]:
    return [p for p in _read_parts(parts) if p["fingerprint"] == fingerprint and p["world_size"] == world_size]


def _claim(lock: Path) -> bool:
    """True for exactly one caller: the file is created atomically or not at all."""
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _part_samples(path: Path) -> Iterator[EncodedProduct]:
    """The samples of a part tar in order, members grouped by key as written."""
    with tarfile.open(path, "r") as tar:
        key, files = None, []
        for member in tar:
            this, suffix = member.name.split(".", 1)
            if key is not None and this != key:
                yield _from_part(files)
                files = []
            key = this
            files.append((suffix, tar.extractfile(member).read()))
        if files:
            yield _from_part(files)


def _from_part(files: list[tuple[str, bytes]]) -> EncodedProduct:
    meta = json.loads(dict(files)["json"])
    return EncodedProduct(meta["product_id"], files, len(meta["images"]), [])


def merge_shards(out_dir: str | Path, progress: bool = False) -> ShardReport:
    """Pack the ranks' parts in `out_dir/.parts` into the shards and write `shards.json`: the
    folder one process would have written. Needs one complete set of parts (every rank of the
    same sharding); the parts are removed afterwards."""
    begin = time.time()
    out = Path(out_dir)
    parts = out / PARTS_DIR
    found = _read_parts(parts) if parts.is_dir() else []
    if not found:
        raise ValueError(f"{parts}: no parts to merge (write them with rank / world_size first)")
    sets: dict[str, dict[int, dict]] = {}
    for part in found:
        sets.setdefault(part["fingerprint"], {})[part["rank"]] = part
    complete = [ranks for ranks in sets.values() if len(ranks) == next(iter(ranks.values()))["world_size"]]
    if not complete:
        missing = {f: sorted(set(range(next(iter(r.values()))["world_size"])) - set(r)) for f, r in sets.items()}
        raise ValueError(f"{parts}: no complete set of parts; missing ranks by sharding: {missing}")
    if len(complete) > 1:
        raise ValueError(f"{parts}: parts of {len(complete)} different shardings; remove the stale ones")
    ranks = [complete[0][r] for r in sorted(complete[0])]
    first = ranks[0]
    report = ShardReport(str(out), skipped=Counter(first["catalog_skipped"]))
    for part in ranks:  # in rank order: the skip reasons come in the order one process meets them
        report.skipped.update(part["skipped"])
    name = _part_name
    samples = (s for part in ranks for s in _part_samples(parts / f"{name(part['rank'], part['world_size'])}.tar"))
    max_count, max_bytes = _limits(first["max_count"], first["max_size_mb"])
    _pack(out, samples, max_count, max_bytes, report, progress, sum(p["products"] for p in ranks))
    report.seconds = time.time() - begin
    _write_index(out, report, first["source"], first["image_size"], first["seed"])
    shutil.rmtree(parts, ignore_errors=True)
    logger.debug(report.summary())
    return report
