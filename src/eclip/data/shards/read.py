"""Reading shards: URLs (local, `pipe:`, http, any fsspec protocol), the `shards.json` index,
and one tar sample parsed into a ShardSample."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..transforms import open_image, to_uint8_tensor

INDEX_NAME = "shards.json"
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT = "eclip-shards/1"


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
    with open_image(io.BytesIO(data)) as image:
        return to_uint8_tensor(image.convert("RGB"), image_size)

