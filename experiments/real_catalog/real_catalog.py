"""Real data: ECLIP against the CLIP baseline on the Myntra sample, held-out products.

    python experiments/real_catalog/real_catalog.py --threads 2  # the full run (docs/results.md)
    python experiments/real_catalog/real_catalog.py --quick      # a smoke test: ~100 products, a few steps

1. `styles.csv` -> catalog (`eclip.data.csv_import`, category = subCategory, attributes
   baseColour, gender, usage), read in place from `--data` (default: `shared/data/myntra` beside the repository).
2. Split by product id (seeded shuffle): `--heldout-products` held out, `--train-products` for
   training, disjoint.
3. Compose K cluttered scenes per product with true boxes (`eclip.data.compose`), separately
   for each split (a held-out photo is never a distractor in a training scene): training
   products keep their clean photo too (K + 1 images each, what the intra-product objective
   needs); held-out scenes are the instance-level evaluation set.
4. Evaluate the pretrained initialisation (eclip-lite towers, untrained heads, no decoder), then
   fine-tune the CLIP baseline and ECLIP from the same initial weights (same seed: the towers
   and heads are identical, the decoder is ECLIP's extra), same data order, same steps, and
   evaluate each on the held-out products:
   - zero-shot subCategory and baseColour classification on the clean photos (prompt-ensembled
     label names, top-1 and macro-F1) and title-to-product retrieval (R@10),
     `eclip.evaluation.evaluate`;
   - scene-to-catalog retrieval (each held-out scene against the clean photos of all held-out
     products: mAP@10, R@1) and grounding of the scene's product from its title (Acc@IoU0.5,
     pointing game), `eclip.scene_eval.evaluate_scenes`.
   Train-split diagnostics (`--diagnostic-products`): the same scene metrics on training
   products, to read what training did without looking at the held-out split.
   Validation (`--validation-products`): a third set of products, disjoint from both, composed
   on its own and evaluated like the held-out set. Design choices are made there (training
   scenes were seen in training, so the train split flatters what memorises); the held-out
   split is read once per choice, for the report.

Writes `--out` (JSON of every metric, the configuration, losses and wall times) and prints a
Markdown table. The training runs use `eclip_app.train.train` unchanged; nothing is cached
across steps (every step runs the towers on its images), so the arms cost what they cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the towers come from installed packages
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from eclip.config import override  # noqa: E402
from eclip.data import ImageStore, Product, load_catalog  # noqa: E402
from eclip.data.compose import ComposeConfig, available_cores, compose_catalog  # noqa: E402
from eclip.data.csv_import import csv_to_catalog  # noqa: E402
from eclip.evaluation import evaluate  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.model import ECLIP  # noqa: E402
from eclip.presets import model_preset  # noqa: E402
from eclip.scene_eval import evaluate_scenes  # noqa: E402
from eclip_app.optim import OptimConfig  # noqa: E402
from eclip_app.train import make_train_config, train  # noqa: E402

logger = logging.getLogger("eclip.bench.myntra")

# The repository sits beside a `shared/` folder: experiments/real_catalog/ -> repo -> its parent.
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "myntra"

# (column title, results key); None = not measured for that row
COLUMNS = [
    ("subCategory top-1", "classification_top1"),
    ("subCategory macro-F1", "classification_macro_f1"),
    ("subCategory linear probe", "linear_probe_category_top1"),
    ("colour top-1", "attribute_baseColour_top1"),
    ("colour macro-F1", "attribute_baseColour_macro_f1"),
    ("text→product R@10", "text_to_product_r10"),
    ("scene→catalog mAP@10", "scene_to_catalog_map10"),
    ("scene→catalog R@1", "scene_to_catalog_r1"),
    ("grounding Acc@IoU0.5", "scene_grounding_acc50"),
    ("pointing game", "scene_grounding_pointing"),
]
ROWS = [("pretrained (no fine-tuning)", "pretrained"), ("CLIP fine-tuned", "clip"), ("ECLIP fine-tuned", "eclip")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the Myntra folder (styles.csv, images/)")
    p.add_argument("--work", default="runs/bench_myntra", help="catalogs, scenes and runs go here")
    p.add_argument("--out", default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--quick", action="store_true", help="a tiny run (~100 products, a few steps) to smoke-test the pipeline")
    p.add_argument("--seed", type=int, default=0, help="split, scenes, initial weights and data order")
    p.add_argument("--train-products", type=int, default=3000)
    p.add_argument("--heldout-products", type=int, default=1000)
    p.add_argument("--scenes-per-product", type=int, default=3, help="composed scenes per product (both splits)")
    p.add_argument("--image-size", type=int, default=224, help="model input (EfficientNet-Lite0: a grid of size/32; runs 1-3 used 128)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--products-per-batch", type=int, default=32, help="P")
    p.add_argument("--images-per-product", type=int, default=2, help="K (>= 2: the intra-product objective)")
    p.add_argument("--lr", type=float, default=1e-3, help="heads, decoder and temperatures")
    p.add_argument("--tower-lr-scale", type=float, default=0.1, help="lr multiplier of the unfrozen tower blocks")
    p.add_argument("--unfreeze-vision", type=int, default=2, help="trainable last layers of EfficientNet-Lite0 (of 7; -1 = all)")
    p.add_argument("--unfreeze-text", type=int, default=1, help="trainable last blocks of MiniLM-L6 (of 6; -1 = all)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--arms", default="clip,eclip", help="which fine-tuning runs (comma-separated: clip, eclip)")
    p.add_argument("--diagnostic-products", type=int, default=200, help="training products for the train-split scene diagnostics (0: none)")
    p.add_argument("--validation-products", type=int, default=500,
                   help="products in neither split, for choosing designs without the held-out split (0: none)")
    p.add_argument("--validation-only", action="store_true",
                   help="train, then evaluate on validation products (and training diagnostics) only: the held-out split stays unread "
                        "until a choice is made (read it then with --reevaluate READOUT --split heldout)")
    p.add_argument("--eclip-loss-set", action="append", default=[], metavar="KEY=VALUE",
                   help="objective override for the ECLIP arm, e.g. intra_weight=0 (repeatable; an ablation)")
    p.add_argument("--eclip-set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override for the ECLIP arm, e.g. decoder.instance_features=tokens (repeatable); with "
                        "--reevaluate only settings that read a trained model (grounding_map=similarity, box=...)")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); on a loaded machine 1 is faster")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--reevaluate",
        choices=("instance", "global", "mix"),
        help="no training: read WORK's trained ECLIP with this readout (see --split, --arm)",
    )
    p.add_argument("--split", choices=("heldout", "validation"), default="heldout", help="what --reevaluate reads")
    p.add_argument("--arm", choices=("clip", "eclip"), default="eclip", help="which trained model --reevaluate reads")
    args = p.parse_args(argv)
    if args.quick:
        shrink_for_quick(p, args, "runs/bench_myntra_quick", train_products=80, heldout_products=30, scenes_per_product=2,
                         image_size=96, steps=4, products_per_batch=8, warmup=1, diagnostic_products=20, validation_products=20)
    if args.images_per_product < 2:
        p.error("--images-per-product must be >= 2 (the intra-product objective needs two images of a product)")
    args.out = args.out or str(Path(args.work) / "results.json")
    return args


def shrink_for_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, work: str, **sizes) -> None:
    """--quick: the sizes the user left at their defaults shrink to `sizes`, and so does --work."""
    for name, value in sizes.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if args.work == parser.get_default("work"):
        args.work = work


# ----------------------------------------------------------------------------- data


def myntra_catalog(data: Path, work: Path) -> list[Product]:
    """styles.csv -> WORK/catalog.jsonl (category = subCategory; baseColour, gender, usage as
    attributes), read back without opening the images."""
    report = csv_to_catalog(data / "styles.csv", work / "catalog.jsonl", id_column="id", title_column="productDisplayName",
                            image_template="images/{id}.jpg", category_column="subCategory",
                            attribute_columns=["baseColour", "gender", "usage"])
    logger.info(report.summary())
    return load_catalog(work / "catalog.jsonl", check_images=False)[0]


def split_by_product(
    products: list[Product], n_train: int, n_heldout: int, seed: int, n_validation: int = 0, n_extra_train: int = 0
) -> tuple[list[Product], list[Product], list[Product]]:
    """Disjoint train / held-out / validation products: a seeded shuffle of the ids, held-out
    first, then training, then validation (so adding validation changes neither split), then
    `n_extra_train` more training products (so a larger training set keeps both evaluation
    splits the same products)."""
    ids = sorted(p.product_id for p in products)
    random.Random(f"myntra-split-{seed}").shuffle(ids)
    if n_train + n_heldout + n_validation + n_extra_train > len(ids):
        raise SystemExit(f"asked for {n_train} + {n_extra_train} + {n_heldout} + {n_validation} products, "
                         f"the catalog has {len(ids)}")
    by_id = {p.product_id: p for p in products}
    heldout = [by_id[i] for i in ids[:n_heldout]]
    train_ = [by_id[i] for i in ids[n_heldout : n_heldout + n_train]]
    start = n_heldout + n_train
    validation = [by_id[i] for i in ids[start : start + n_validation]]
    start += n_validation
    train_ += [by_id[i] for i in ids[start : start + n_extra_train]]
    return train_, heldout, validation


def write_catalog(products: list[Product], path: Path) -> Path:
    lines = []
    for p in products:
        record = {"product_id": p.product_id, "title": p.title, "images": [im.path for im in p.images]}
        if p.category is not None:
            record["category"] = p.category
        if p.attributes:
            record["attributes"] = p.attributes
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def compose_once(products: list[Product], out: Path, config: ComposeConfig, progress: bool) -> tuple[Path, float]:
    """Compose scenes, or reuse the folder when it holds the same products and settings."""
    stamp = hashlib.sha256(json.dumps([[p.product_id for p in products], asdict(config)]).encode()).hexdigest()
    stamp_file = out / "bench_stamp.txt"
    if stamp_file.is_file() and stamp_file.read_text() == stamp and (out / "catalog.jsonl").is_file():
        logger.info("reusing the scenes in %s", out)
        return out / "catalog.jsonl", 0.0
    result = compose_catalog(products, out, config, progress=progress, workers=available_cores())
    stamp_file.write_text(stamp)
    logger.info("composed %d scenes of %d products in %.1f s (%d empty cut-outs)", result.scenes, result.products, result.seconds, result.empty_masks)
    return result.catalog, result.seconds


def scenes_only(products: list[Product], k: int) -> list[Product]:
    """Training products with their first k images (the scenes), the clean photo dropped."""
    return [replace(p, images=p.images[:k]) for p in products]


# ----------------------------------------------------------------------------- models


def build_config(args: argparse.Namespace, objective: str, catalog: Path):
    optim = OptimConfig(
        tower_lr_scale=args.tower_lr_scale,
        freeze_vision=args.unfreeze_vision >= 0,
        freeze_text=args.unfreeze_text >= 0,
        unfreeze_last_vision_blocks=max(args.unfreeze_vision, 0),
        unfreeze_last_text_blocks=max(args.unfreeze_text, 0),
    )
    config = make_train_config(
        "eclip-lite", objective, catalog=str(catalog), out_dir=str(Path(args.work) / objective),
        steps=args.steps, products_per_batch=args.products_per_batch, images_per_product=args.images_per_product,
        lr=args.lr, warmup_steps=args.warmup, seed=args.seed, optim=optim, checkpoint_every=min(args.steps, 250),
        keep_checkpoints=1, log_every=max(1, min(10, args.steps // 10)), tensorboard=False,
    )
    config.model.vision.image_size = args.image_size
    if objective == "eclip" and args.eclip_set:
        config.model = override(config.model, args.eclip_set)
    if objective == "eclip" and args.eclip_loss_set:
        config.loss = override(config.loss, args.eclip_loss_set)
    return config


def pretrained_model(args: argparse.Namespace) -> ECLIP:
    """The initialisation both arms start from, read as the baseline reads it (no decoder):
    product embedding = global embedding, grounding = MaskCLIP-style token similarity. The
    seed is set as `train` sets it, so these are exactly the CLIP arm's initial weights."""
    config = model_preset("eclip-lite", objective="clip")
    config.vision.image_size = args.image_size
    torch.manual_seed(args.seed)
    return ECLIP(config).eval()


def evaluate_all(model: ECLIP, heldout: list[Product], heldout_scenes: list[Product], diagnostics: tuple | None,
                 args: argparse.Namespace) -> tuple[dict, dict]:
    progress = not args.no_progress
    start = time.perf_counter()
    results = evaluate(model, heldout, batch_size=args.eval_batch, progress=progress)
    results |= evaluate_scenes(model, heldout_scenes, heldout, batch_size=args.eval_batch, progress=progress)
    results["eval_seconds"] = round(time.perf_counter() - start, 1)
    train_diag = {}
    if diagnostics is not None:
        scenes, clean = diagnostics
        train_diag = evaluate_scenes(model, scenes, clean, batch_size=args.eval_batch, progress=progress)
    return results, train_diag


# ----------------------------------------------------------------------------- report


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for title, key in ROWS:
        if key in results:
            lines.append(f"| {title} | " + " | ".join(fmt(results[key].get(k)) for _, k in COLUMNS) + " |")
    some = next((results[k] for _, k in ROWS if k in results), {})
    floor = {"scene_grounding_acc50": some.get("scene_grounding_acc50_random_box"),
             "scene_grounding_pointing": some.get("scene_grounding_pointing_random")}
    lines.append("| random floor | " + " | ".join(fmt(floor.get(k)) if k in floor else "" for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def diagnostics_table(diag: dict) -> str:
    keys = [("scene→catalog mAP@10", "scene_to_catalog_map10"), ("R@1", "scene_to_catalog_r1"),
            ("grounding Acc@IoU0.5", "scene_grounding_acc50"), ("pointing game", "scene_grounding_pointing"),
            ("mean IoU", "scene_grounding_mean_iou")]
    lines = ["| model (training products) | " + " | ".join(c for c, _ in keys) + " |", "|---|" + "---|" * len(keys)]
    for title, key in ROWS:
        if key in diag:
            lines.append(f"| {title} | " + " | ".join(fmt(diag[key].get(k)) for _, k in keys) + " |")
    return "\n".join(lines)


def losses_line(history: list[dict], tail: int = 5) -> dict:
    """Last logged losses, and their mean over the last `tail` log records (less noisy)."""
    names = [k for k in history[-1] if k.startswith("loss_")]
    last = history[-tail:]
    return {
        "final": {k.removeprefix("loss_"): history[-1][k] for k in names},
        f"mean_last_{len(last)}_logs": {k.removeprefix("loss_"): round(sum(r[k] for r in last) / len(last), 4) for k in names},
        "first": {k.removeprefix("loss_"): history[0][k] for k in names},
    }


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def reevaluate(work: Path, args: argparse.Namespace) -> int:
    """Read a model a finished run saved (`--arm`), ECLIP with another readout
    (`ModelConfig.readout`; training is untouched by the readout, so nothing is retrained), on
    the held-out or the validation split (`--split`; composed here if the run predates it)."""
    data = prepare(args, work)
    products, scenes = (data.heldout, data.heldout_scenes) if args.split == "heldout" else (data.validation, data.validation_scenes)
    if not products:
        raise SystemExit("--split validation needs --validation-products > 0")
    model = load_model(work / args.arm / "model").eval()
    if args.arm == "eclip":
        # how the trained model is read (readout, grounding_map, box): weights are untouched
        model.config = override(model.config, [f"readout={args.reevaluate}", *args.eclip_set])
    results, _ = evaluate_all(model, products, scenes, None, args)
    name = f"{args.arm}_{args.reevaluate}" if args.arm == "eclip" else "clip"
    if args.arm == "eclip" and model.config.grounding_map != "attention":
        name += f"_{model.config.grounding_map}"
    out = work / f"{args.split}_{name}.json"  # e.g. heldout_eclip_instance_contribution.json
    out.write_text(json.dumps({"readout": args.reevaluate, "split": args.split, "arm": args.arm, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                               "machine": machine(), args.arm: results}, indent=2))
    title = "ECLIP fine-tuned" if args.arm == "eclip" else "CLIP fine-tuned"
    print(f"{args.split} split")
    print(markdown_table({args.arm: results}).replace(title, f"{title}, readout {args.reevaluate}" if args.arm == "eclip" else title))
    print(f"results: {out}")
    return 0


@dataclass
class BenchData:
    train_catalog: Path
    train_scenes: list[Product]  # training products: their scenes and their clean photo
    heldout: list[Product]  # held-out products, clean photos
    heldout_scenes: list[Product]
    validation: list[Product]  # neither split: where choices are made
    validation_scenes: list[Product]
    compose_seconds: float


def prepare(args: argparse.Namespace, work: Path) -> BenchData:
    """1-3: catalog, split by product, scenes (reused when already composed)."""
    data = Path(args.data)
    products = myntra_catalog(data, work)
    train_products, heldout, validation = split_by_product(
        products, args.train_products, args.heldout_products, args.seed, args.validation_products
    )
    heldout, _ = load_catalog(write_catalog(heldout, work / "heldout.jsonl"))
    if validation:
        validation, _ = load_catalog(write_catalog(validation, work / "validation.jsonl"))

    # scenes: training products (K scenes + the clean photo), held-out and validation products
    # (K scenes), each set composed on its own
    t = time.perf_counter()
    base = ComposeConfig(scenes_per_product=args.scenes_per_product, size=224, seed=args.seed)
    train_catalog, _ = compose_once(train_products, work / "train_scenes", replace(base, keep_clean=True), not args.no_progress)
    scene_catalogs = {}
    for name, split in (("heldout", heldout), ("validation", validation)):
        if split:
            scene_catalogs[name], _ = compose_once(split, work / f"{name}_scenes", replace(base, keep_clean=False), not args.no_progress)
    seconds = round(time.perf_counter() - t, 1)
    train_scenes, _ = load_catalog(train_catalog)
    heldout_scenes, _ = load_catalog(scene_catalogs["heldout"])
    validation_scenes = load_catalog(scene_catalogs["validation"])[0] if validation else []
    logger.info("split: %d training products (%d images), %d held-out products (%d scenes), %d validation products",
                len(train_scenes), sum(len(p.images) for p in train_scenes), len(heldout),
                sum(len(p.images) for p in heldout_scenes), len(validation))
    return BenchData(train_catalog, train_scenes, heldout, heldout_scenes, validation, validation_scenes, seconds)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("eclip.data").setLevel(logging.WARNING)  # per-line catalog chatter
    data = Path(args.data)
    if not (data / "styles.csv").is_file() or not (data / "images").is_dir():
        print(f"experiments/real_catalog/real_catalog.py: no Myntra data at {data} (styles.csv and images/ expected); skipping.")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not set(arms) <= {"clip", "eclip"}:
        raise SystemExit(f"--arms: clip and/or eclip, got {args.arms!r}")
    progress = not args.no_progress
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.reevaluate:
        return reevaluate(work, args)
    begin = time.time()
    timings: dict[str, float] = {}

    bench = prepare(args, work)
    timings["compose_s"] = bench.compose_seconds
    train_scenes, heldout, heldout_scenes = bench.train_scenes, bench.heldout, bench.heldout_scenes
    diagnostics = None
    if args.diagnostic_products > 0:
        # training products, seen in training: their scenes against their clean photos
        diag = train_scenes[: args.diagnostic_products]
        diagnostics = (scenes_only(diag, args.scenes_per_product), [replace(p, images=p.images[-1:]) for p in diag])

    results: dict[str, dict] = {}
    diag_results: dict[str, dict] = {}
    validation_results: dict[str, dict] = {}
    losses: dict[str, dict] = {}

    # 4. the pretrained initialisation
    if not args.validation_only:
        t = time.perf_counter()
        results["pretrained"], diag_results["pretrained"] = evaluate_all(pretrained_model(args), heldout, heldout_scenes, diagnostics, args)
        timings["pretrained_eval_s"] = round(time.perf_counter() - t, 1)

    # fine-tuning, both arms from the same initial weights and the same batches
    store = ImageStore(train_scenes, args.image_size)  # decoded once, shared by both arms
    for arm in arms:
        config = build_config(args, arm, bench.train_catalog)
        result = train(config, progress=progress, store=store)
        if result.stopped_by_signal:  # train() checkpoints and returns on SIGTERM/SIGINT: stop here too
            raise SystemExit(f"{arm}: stopped by a signal at a checkpoint in {config.out_dir}; benchmark aborted")
        timings[f"{arm}_train_s"] = round(result.seconds, 1)
        losses[arm] = losses_line(result.history)
        logger.info("%s: %d steps in %.0f s; final losses %s", arm, config.steps, result.seconds, losses[arm]["final"])
        t = time.perf_counter()
        if bench.validation:
            validation_results[arm], _ = evaluate_all(result.model, bench.validation, bench.validation_scenes, None, args)
        if args.validation_only:
            results[arm] = {}
            if diagnostics is not None:
                diag_results[arm] = evaluate_scenes(result.model, *diagnostics, batch_size=args.eval_batch, progress=progress)
        else:
            results[arm], diag_results[arm] = evaluate_all(result.model, heldout, heldout_scenes, diagnostics, args)
        timings[f"{arm}_eval_s"] = round(time.perf_counter() - t, 1)
        results[arm]["train_seconds"] = round(result.seconds, 1)
        results[arm]["samples_per_s"] = round(config.steps * config.products_per_batch * config.images_per_product / result.seconds, 2)
        del result

    timings["total_s"] = round(time.time() - begin, 1)
    command = "python experiments/real_catalog/real_catalog.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = {
        "command": command.strip(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "args": vars(args),
        "split": {"train_products": len(train_scenes), "train_images": sum(len(p.images) for p in train_scenes),
                  "heldout_products": len(heldout), "heldout_scenes": sum(len(p.images) for p in heldout_scenes),
                  "validation_products": len(bench.validation),
                  "heldout_subcategories": len({p.category for p in heldout}),
                  "heldout_colours": len({p.attributes.get("baseColour") for p in heldout})},
        "results": results,
        "validation": validation_results,
        "train_diagnostics": diag_results,
        "losses": losses,
        "timings": timings,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    if not args.validation_only:
        print()
        print(markdown_table(results))
    if validation_results:
        print("\nvalidation products (where choices are made)")
        print(markdown_table(validation_results))
    if diagnostics is not None:
        print()
        print(diagnostics_table(diag_results))
    print()
    for arm, entry in losses.items():
        print(f"{arm} losses, last log: {entry['final']}  (first: {entry['first']})")
    print(f"timings: {timings}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
