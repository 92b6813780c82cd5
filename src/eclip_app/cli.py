"""The `eclip` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, steps=args.steps, products=args.products, progress=not args.no_progress)
    return 0


def _train(args) -> int:
    from .train import load_train_config, train

    config = load_train_config(args.config, args.set)
    if args.catalog:
        config.catalog = args.catalog
    if args.out:
        config.out_dir = args.out
    if not config.catalog:
        print("eclip train: no catalog (give --catalog or set catalog in the config)", file=sys.stderr)
        return 2
    result = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"model saved to {result.out_dir / 'model'}")
    return 0


def _eval(args) -> int:
    from eclip.data import load_catalog
    from eclip.evaluation import evaluate
    from eclip.io import load_model

    from .report import comparison_table

    model = load_model(args.model)
    products, _ = load_catalog(args.catalog)
    results = evaluate(model, products, batch_size=args.batch_size, progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(comparison_table({args.model: results}))
    return 0


def _synth(args) -> int:
    from eclip.data import ShopSynthConfig, generate

    paths = generate(args.out, ShopSynthConfig(num_products=args.products, images_per_product=args.images, image_size=args.size, seed=args.seed))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _validate(args) -> int:
    from eclip.data import CatalogError, load_catalog

    try:
        _, report = load_catalog(args.catalog)
    except CatalogError as error:
        print(f"eclip catalog validate: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eclip", description="Instance-level multi-modal pretraining for e-commerce (ECLIP).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="ShopSynth -> train ECLIP and the CLIP baseline -> compare on held-out products")
    demo.add_argument("--out", default="runs/demo", help="report folder (report.md, results.json, PNGs)")
    demo.add_argument("--quick", action="store_true", help="a smaller run, under 3 minutes on 2 cores")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default: by size)")
    demo.add_argument("--products", type=int, default=None, help="ShopSynth products (default: by size)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train on a catalog (JSON Lines)")
    tr.add_argument("--config", help="TOML or JSON file of TrainConfig fields (model_preset, objective, steps, model.*, loss.*, ...)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. --set steps=500 --set model.decoder.num_queries=16")
    tr.add_argument("--catalog", help="training catalog (overrides the config)")
    tr.add_argument("--out", help="run folder (overrides the config's out_dir)")
    tr.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="zero-shot evaluation of a saved model on a catalog")
    ev.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    ev.add_argument("--catalog", required=True, help="held-out catalog (JSON Lines)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)

    sy = sub.add_parser("synth", help="generate a ShopSynth catalog (train / heldout split by product)")
    sy.add_argument("--out", required=True)
    sy.add_argument("--products", type=int, default=1000)
    sy.add_argument("--images", type=int, default=3, help="listing images per product")
    sy.add_argument("--size", type=int, default=128, help="image side in pixels")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(func=_synth)

    cat = sub.add_parser("catalog", help="catalog tools")
    cat_sub = cat.add_subparsers(dest="catalog_command", required=True)
    va = cat_sub.add_parser("validate", help="check a catalog and report every bad line")
    va.add_argument("catalog")
    va.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
