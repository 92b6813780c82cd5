"""`eclip compose` speed: one worker against N workers, and the cut-out cache before and after.

    python benchmarks/compose_speed.py [--products 3000] [--scenes-per-product 2] [--workers N]

A catalog of the first `--products` rows of the Myntra sample is made as docs/data.md's `eclip
catalog from-csv` command makes it (category = subCategory), then composed three times at 224 px
into fresh folders under `--out`:

1. one worker, cut-outs cached as before: at most 2,048 in memory per process, none on disk;
2. one worker, cut-outs cached by bytes in memory (1 GiB: each photo cut out once);
3. `--workers` processes (default: all cores), cut-outs shared on disk (each photo cut out once
   on the machine) and cached by bytes in each process.

Each arm's catalog and images must equal arm 1's byte for byte (the `same` column). Prints a
Markdown table: wall seconds, scenes/s, scenes/s per core (per worker process), photos cut out.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

from eclip.data import load_catalog
from eclip.data.compose import ComposeConfig, available_cores, compose_catalog
from eclip.data.csv_import import csv_to_catalog

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "myntra"


def digest(folder: Path) -> str:
    """One hash of the catalog text and every image's bytes."""
    h = hashlib.sha256((folder / "catalog.jsonl").read_bytes())
    for path in sorted((folder / "images").iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with styles.csv and images/")
    parser.add_argument("--out", type=Path, default=Path("runs/compose_speed"))
    parser.add_argument("--products", type=int, default=3000, help="first N rows of styles.csv")
    parser.add_argument("--scenes-per-product", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=None, help="workers of arm 3 (default: all cores)")
    args = parser.parse_args()
    workers = args.workers or available_cores()

    args.out.mkdir(parents=True, exist_ok=True)
    catalog = args.out / "catalog.jsonl"
    csv_to_catalog(args.data / "styles.csv", catalog, id_column="id", title_column="productDisplayName",
                   image_template="images/{id}.jpg", category_column="subCategory",
                   attribute_columns=["baseColour", "gender", "usage"], limit=args.products)
    products, _ = load_catalog(catalog)
    config = ComposeConfig(scenes_per_product=args.scenes_per_product, size=args.size)

    arms = [
        ("1 worker, cache before (2,048 cut-outs per process)", dict(workers=1, cache_items=2048, cache_mb=None, share_cutouts=False)),
        ("1 worker, cache after (by bytes)", dict(workers=1)),
        (f"{workers} workers, cache after + shared on disk", dict(workers=workers)),
    ]
    rows, reference = [], None
    for name, options in arms:
        folder = args.out / f"arm{len(rows) + 1}"
        shutil.rmtree(folder, ignore_errors=True)
        result = compose_catalog(products, folder, config, progress=False, **options)
        tree = digest(folder)
        reference = reference or tree
        rows.append((name, result.workers, result.scenes, result.seconds, result.scenes_per_second, result.cut_outs, tree == reference))
        print(f"{name}: {result.scenes_per_second:.1f} scenes/s", file=sys.stderr)

    base = rows[0][4]
    print(f"\n{len(products)} Myntra products x {args.scenes_per_product} scenes at {args.size} px; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| arm | workers | scenes | seconds | scenes/s | scenes/s per core | vs arm 1 | photos cut out | same |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, n, scenes, seconds, rate, cuts, same in rows:
        print(f"| {name} | {n} | {scenes} | {seconds:.1f} | {rate:.1f} | {rate / n:.1f} | {rate / base:.2f}x | {cuts} | {'yes' if same else 'NO'} |")
    print(f"\n{workers} workers against 1 (both with the new cache): {rows[2][4] / rows[1][4]:.2f}x")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
