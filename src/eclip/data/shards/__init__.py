"""Product-grouped WebDataset shards, for catalogs too large to decode into memory or stored away
from the trainer: `write` (catalog -> `shard-000000.tar`, ... + `shards.json`, on one process or
many), `read` (URLs, the index, one sample) and `stream` (an endless stream of the same `Batch`
as the map-style path: ImageStore + PKSampler + collate).

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

from .read import (
    FORMAT,
    INDEX_NAME,
    SHARD_PATTERN,
    SampleError,
    ShardSample,
    decode_image,
    expand_urls,
    iter_raw_samples,
    open_url,
    parse_sample,
    read_index,
    read_shard,
)
from .stream import ShardStream, StreamConfig, generate_batches
from .write import (
    ShardReport,
    default_workers,
    merge_shards,
    sample_key,
    write_product_shards,
    write_shards,
)

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "SHARD_PATTERN",
    "SampleError",
    "ShardReport",
    "ShardSample",
    "ShardStream",
    "StreamConfig",
    "decode_image",
    "default_workers",
    "expand_urls",
    "generate_batches",
    "iter_raw_samples",
    "merge_shards",
    "open_url",
    "parse_sample",
    "read_index",
    "read_shard",
    "sample_key",
    "write_product_shards",
    "write_shards",
]
