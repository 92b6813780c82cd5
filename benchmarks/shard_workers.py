"""`eclip shard` speed by encoding processes: products/s with 1, 2, ... workers on one catalog,
and whether every run wrote the same bytes (it must: workers change the speed only). The
writing time (encode and pack) is reported apart from the total, which adds load_catalog's
check of every image (one process).

A ShopSynth catalog is generated in a temporary folder (or give --catalog); `--image-size`
re-encodes every image (decode, resize, JPEG), the costly case the workers are for; without it
the files are copied and the run measures reading and tar writing.

    python benchmarks/shard_workers.py                          # 1 and 2 workers, 400 products
    python benchmarks/shard_workers.py --workers 1 2 4 8 16 --products 4000
    python benchmarks/shard_workers.py --catalog data/train.jsonl --image-size 224
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from eclip.data import ShopSynthConfig, generate
from eclip.data.shards import write_shards


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", help="a catalog (JSON Lines); default: a generated ShopSynth catalog")
    parser.add_argument("--products", type=int, default=400, help="ShopSynth products (without --catalog)")
    parser.add_argument("--source-size", type=int, default=256, help="ShopSynth image side (without --catalog)")
    parser.add_argument("--image-size", type=int, default=128, help="re-encode to SxS; 0 copies the files as they are")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count; the best is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="eclip-shard-bench-") as tmp:
        catalog = args.catalog
        if catalog is None:
            paths = generate(Path(tmp) / "synth", ShopSynthConfig(num_products=args.products, images_per_product=3,
                                                                 image_size=args.source_size, seed=0), progress=False)
            catalog = str(paths["train"])
        rows = []
        for workers in args.workers:
            best = None
            for repeat in range(args.repeats):
                out = Path(tmp) / f"out-{workers}-{repeat}"
                start = time.perf_counter()
                report = write_shards(catalog, out, max_size_mb=64, image_size=args.image_size or None, workers=workers)
                total = time.perf_counter() - start
                # report.seconds: encoding and packing; the rest is load_catalog checking every image
                if best is None or report.seconds < best[0]:
                    best = (report.seconds, total)
            rows.append((workers, report.products, *best, folder_digest(out)))
        base = rows[0][2]
        print(f"catalog: {catalog}; image size: {args.image_size or 'copied'}")
        print("| workers | products | writing s | products/s writing | speed-up | with catalog check s | output sha256 |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for workers, products, seconds, total, digest in rows:
            print(f"| {workers} | {products} | {seconds:.2f} | {products / seconds:.0f} | {base / seconds:.2f}x | {total:.2f} | {digest} |")
        if len({digest for *_, digest in rows}) != 1:
            raise SystemExit("the outputs differ between worker counts")


if __name__ == "__main__":
    main()
