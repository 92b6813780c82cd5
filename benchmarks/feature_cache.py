"""Training with and without the locked-tower feature cache, on the real recipe, in one run.

eclip-lite (EfficientNet-Lite0 frozen but its last 2 of 7 stages, MiniLM frozen but its last
block, tower lr x0.1), P=32, K=2, on a composed Myntra catalog (clean photo + 2 scenes per
product, so K=2 draws no augmented view) or, without the Myntra folder, ShopSynth. The same N
steps run twice through `eclip_app.train.train` from the same seed, with the cache (filled up
front by the same code `eclip cache-features` runs) and without it, taking turns. Printed: samples/s
each way (with the cache: excluding and including the one-off fill), and the total loss of
each way at each step with the largest difference.

    python benchmarks/feature_cache.py                    # 224 px, 20 steps each way
    python benchmarks/feature_cache.py --image-size 320
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the towers come from installed packages

import torch  # noqa: E402

from eclip.data import ImageStore, ShopSynthConfig, generate, load_catalog  # noqa: E402
from eclip.data.compose import ComposeConfig, compose_catalog  # noqa: E402
from eclip.data.csv_import import csv_to_catalog  # noqa: E402
from eclip_app.feature_cache import build_cache_for_config  # noqa: E402
from eclip_app.optim import OptimConfig  # noqa: E402
from eclip_app.train import make_train_config, train  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "myntra"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the Myntra folder (styles.csv, images/); ShopSynth when absent")
    p.add_argument("--work", default="runs/bench_feature_cache")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="training steps each way")
    p.add_argument("--products", type=int, default=320, help="catalog size (P=32: 10 batches an epoch)")
    p.add_argument("--products-per-batch", type=int, default=32)
    p.add_argument("--images-per-product", type=int, default=2)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--chunk", type=int, default=2, help="steps per turn of each way (>= 2: a turn's first step is not timed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def build_catalog(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """3 images per product: Myntra's clean photo + 2 composed scenes, or ShopSynth."""
    data = Path(args.data)
    if (data / "styles.csv").is_file():
        out = work / f"myntra_{args.products}_{args.image_size}"
        if not (out / "catalog.jsonl").is_file():
            csv_to_catalog(data / "styles.csv", work / "myntra.jsonl", id_column="id", title_column="productDisplayName",
                           image_template="images/{id}.jpg", category_column="subCategory", limit=args.products)
            products, _ = load_catalog(work / "myntra.jsonl")
            config = ComposeConfig(scenes_per_product=2, size=args.image_size, seed=0, keep_clean=True)
            compose_catalog(products, out, config, progress=False)
        return out / "catalog.jsonl", f"Myntra, {args.products} products, clean photo + 2 composed scenes each"
    out = work / f"shopsynth_{args.products}_{args.image_size}"
    if not (out / "catalog.jsonl").is_file():
        generate(out, ShopSynthConfig(num_products=args.products, images_per_product=3, image_size=args.image_size, seed=0), progress=False)
    return out / "catalog.jsonl", f"ShopSynth, {args.products} products, 3 images each"


def recipe(args: argparse.Namespace, catalog: Path, out: Path, **fields):
    """experiments/real_catalog's ECLIP arm: eclip-lite, unfreeze 2 vision stages / 1 text block."""
    optim = OptimConfig(tower_lr_scale=0.1, freeze_vision=True, freeze_text=True, unfreeze_last_vision_blocks=2, unfreeze_last_text_blocks=1)
    config = make_train_config(
        "eclip-lite", "eclip", catalog=str(catalog), out_dir=str(out), steps=args.steps, products_per_batch=args.products_per_batch,
        images_per_product=args.images_per_product, lr=1e-3, warmup_steps=20, seed=0, optim=optim, checkpoint_every=args.steps,
        keep_checkpoints=1, log_every=1, tensorboard=False, device=args.device, **fields,
    )
    config.model.vision.image_size = args.image_size
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    catalog, described = build_catalog(args, work)
    products, _ = load_catalog(catalog)
    store = ImageStore(products, args.image_size)  # decoded once, shared by both ways
    store.preload(progress=False)
    batch = args.products_per_batch * args.images_per_product

    config = recipe(args, catalog, work / "cached", feature_cache=True, feature_cache_dir=str(work / f"cache_{args.image_size}_{args.dtype}"),
                    feature_cache_dtype=args.dtype)
    cache_dir = Path(config.feature_cache_dir)
    if cache_dir.exists():  # the one-off fill is part of what is measured
        for file in cache_dir.iterdir():
            file.unlink()
    cache = build_cache_for_config(config, products, cache_dir, args.device)
    cache.store = store  # the images already decoded: the fill measures the towers, as the live run does
    t = time.perf_counter()
    rows = cache.fill(progress=False)
    fill_s = time.perf_counter() - t
    del cache
    # the two ways take turns, `--chunk` steps each (a stop with a checkpoint, then a resume), so
    # that a shared machine's changing load falls on both alike; the first step after each
    # resume (a fresh model) is left out of the rates
    arms = {"cached": config, "live": recipe(args, catalog, work / "live")}
    for arm in arms.values():
        shutil.rmtree(arm.out_dir, ignore_errors=True)
    history: dict[str, list[dict]] = {name: [] for name in arms}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for start in range(0, args.steps, args.chunk):
        stop = min(start + args.chunk, args.steps)
        for name, arm in arms.items():
            new = [r for r in train(arm, resume=start > 0, progress=False, store=store, stop_at=stop).history if r["step"] > start]
            history[name] += new
            rates[name] += [r["samples_per_s"] for r in new[1:]]
    live_rate, cached_rate = (len(rates[n]) * batch / sum(batch / r for r in rates[n]) for n in ("live", "cached"))
    with_fill = args.steps * batch / (args.steps * batch / cached_rate + fill_s)
    losses = [(r["step"], r["loss_total"], c["loss_total"]) for r, c in zip(history["live"], history["cached"])]
    max_diff = max(abs(a - b) for _, a, b in losses)
    mib = sum(f.stat().st_size for f in cache_dir.iterdir()) / 2**20
    load_after = os.getloadavg()

    print(f"\n### Feature cache: eclip-lite at {args.image_size} px, P={args.products_per_batch}, K={args.images_per_product}, "
          f"{args.steps} steps each way\n")
    print(f"{described}; {len(products) * 3} images; cache {args.dtype}, {mib:.0f} MiB on disk; device {args.device}; "
          f"nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
    print("| run | samples/s | x live |")
    print("|---|---:|---:|")
    print(f"| live (no cache) | {live_rate:.1f} | 1.00 |")
    print(f"| cached, steps only | {cached_rate:.1f} | {cached_rate / live_rate:.2f} |")
    print(f"| cached, incl. one-off fill ({rows} rows, {fill_s:.1f} s) | {with_fill:.1f} | {with_fill / live_rate:.2f} |")
    print(f"\n(samples/s over {len(rates['live'])} timed steps each way, taking turns {args.chunk} steps at a time)")
    print(f"\nLoss per step (max |difference| {max_diff:.2e}):\n")
    print("| step | live loss | cached loss |")
    print("|---:|---:|---:|")
    for step, a, b in losses:
        print(f"| {step} | {a:.5f} | {b:.5f} |")
    (work / f"results_{args.image_size}.json").write_text(json.dumps({
        "image_size": args.image_size, "steps": args.steps, "live_samples_per_s": live_rate, "cached_samples_per_s": cached_rate,
        "cached_with_fill_samples_per_s": with_fill, "fill_s": fill_s, "max_loss_difference": max_diff, "losses": losses,
        "load_before": load_before, "load_after": load_after, "nproc": os.cpu_count(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
