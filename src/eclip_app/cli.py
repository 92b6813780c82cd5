"""The `eclip` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _demo(args) -> int:
    from .demo import DEMO_PRESET, run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, steps=args.steps, products=args.products, progress=not args.no_progress,
             synth=args.synth, preset=args.preset or DEMO_PRESET, device=args.device,
             **({} if args.time_budget is None else {"time_budget_minutes": args.time_budget}))
    return 0


# `eclip train`'s exit codes (its --help lists them)
TRAIN_EXIT_CODES = {
    0: "trained to the last step; the model is in OUT/model",
    1: "the run failed: no usable training data, a non-finite loss that would not go away, or no checkpoint that reads",
    2: "a bad command or config (a field, a value, a preset): nothing ran",
    130: "stopped by SIGINT (Ctrl-C) after writing a checkpoint; no model written; continue with --resume",
    143: "stopped by SIGTERM (a scheduler's pre-emption, kill) after writing a checkpoint; no model written; continue with --resume",
}


def _resume_command(args) -> str:
    import shlex

    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    return shlex.join(["eclip", *argv, *([] if "--resume" in argv else ["--resume"])])


def _train(args) -> int:
    import signal

    from eclip.data import CatalogError

    from .train import CheckpointError, NonFiniteLossError, load_train_config, train

    try:
        config = load_train_config(args.config, args.set)
    except ValueError as error:  # a bad --set or config file: one line, before anything runs
        print(f"eclip train: {error}", file=sys.stderr)
        return 2
    if args.catalog:
        config.catalog = args.catalog
    if args.shards:
        config.shards = args.shards
    if args.out:
        config.out_dir = args.out
    for name in ("val_catalog", "val_scene_catalog", "val_every", "report_to"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.device:
        config.device = args.device
    if not config.catalog and not config.shards:
        print("eclip train: no training data (give --catalog or --shards, or set catalog or shards in the config)", file=sys.stderr)
        return 2
    from .feature_cache import FeatureCacheError
    from .training.checkpoint import checkpoint_dir
    from .training.config import SettingError

    try:
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except SettingError as error:  # a setting found wrong when the run starts (a bad val catalog, ...)
        print(f"eclip train: {error}", file=sys.stderr)
        return 2
    except (CatalogError, NonFiniteLossError, CheckpointError) as error:  # the data or the run: one line
        print(f"eclip train: {error}", file=sys.stderr)
        return 1
    except (FeatureCacheError, ValueError) as error:  # a cache the config would make wrong, P over the products, ...
        logging.getLogger("eclip.train").debug("eclip train failed", exc_info=True)
        print(f"eclip train: {error}", file=sys.stderr)
        return 2
    if result.model_dir is None:  # stopped early: a checkpoint, no model
        name = signal.Signals(result.signal).name if result.signal else "request"
        print(f"eclip train: stopped by {name} at step {result.step} of {config.steps}; checkpoint in "
              f"{checkpoint_dir(result.out_dir)}; no model written. Resume with: {_resume_command(args)}", file=sys.stderr)
        return 128 + result.signal if result.signal else 1
    print(f"model saved to {result.model_dir}")
    return 0


def _cache_features(args) -> int:
    from eclip.data import load_catalog
    from eclip.devices import resolve_device

    from .feature_cache import FeatureCacheError, build_cache_for_config
    from .train import load_train_config

    try:
        config = load_train_config(args.config, args.set)
    except ValueError as error:
        print(f"eclip cache-features: {error}", file=sys.stderr)
        return 2
    config.feature_cache_dir = args.out
    if args.dtype:
        config.feature_cache_dtype = args.dtype
    products, _ = load_catalog(args.catalog)
    try:
        cache = build_cache_for_config(config, products, args.out, str(resolve_device(args.device)))
    except FeatureCacheError as error:
        print(f"eclip cache-features: {error}", file=sys.stderr)
        return 2
    cache.batch_size = args.batch_size
    done = cache.fill(progress=not args.no_progress)
    print(f"feature cache in {args.out}: {done} rows computed, complete "
          f"(train with --set feature_cache=true --set feature_cache_dir={args.out} and the same settings)")
    return 0


def _device_option(parser, default: str | None = "auto") -> None:
    parser.add_argument("--device", default=default, help="where the model runs: cpu, cuda, cuda:1, ... (auto: CUDA when present, else the CPU)")


def _read_options(parser) -> None:
    from eclip.config import GROUNDING_MAPS, READOUTS

    parser.add_argument("--readout", choices=READOUTS, help="what a decoder model is read by (default: its config's readout)")
    parser.add_argument("--grounding-map", choices=GROUNDING_MAPS, help="the map a decoder model grounds with (default: its config's)")


def _eval(args) -> int:
    from eclip.data import load_catalog
    from eclip.evaluation import evaluate
    from eclip.io import load_model

    from .report import comparison_table

    model = load_model(args.model, device=args.device)
    products, _ = load_catalog(args.catalog)
    results = evaluate(model, products, batch_size=args.batch_size, progress=not args.no_progress and not args.json,
                       readout=args.readout, grounding_map=args.grounding_map)
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


def _from_csv(args) -> int:
    from eclip.data import CatalogError
    from eclip.data.csv_import import ImportArgumentError, csv_to_catalog

    columns = [c.strip() for c in args.attribute_columns.split(",") if c.strip()] if args.attribute_columns else []
    try:
        report = csv_to_catalog(
            args.csv, args.out, id_column=args.id_column, title_column=args.title_column,
            image_template=args.image_template, image_root=args.image_root, category_column=args.category_column,
            attribute_columns=columns, limit=args.limit, delimiter=args.delimiter, relative_paths=args.relative_paths,
            encoding=args.encoding,
        )
    except ImportArgumentError as error:  # a mistake in the command: name the flag
        flag = {"columns": "--id-column/--title-column"}.get(error.argument, f"--{error.argument.replace('_', '-')}")
        print(f"eclip catalog from-csv: {flag}: {error}", file=sys.stderr)
        return 2
    except CatalogError as error:
        print(f"eclip catalog from-csv: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.products else 1


def _compose_config(args):
    """ComposeConfig from the regime preset and the flags given (ValueError on a bad mix)."""
    from eclip.data.compose import GEOMETRY, regime_config

    overrides = {"scenes_per_product": args.scenes_per_product, "size": args.size, "seed": args.seed, "keep_clean": args.keep_clean}
    for name in [*GEOMETRY, "banner_probability", "banners", "clutter", "backgrounds", "camera_probability", "people_probability",
                 "occluder_probability", "max_occlusion"]:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.product_scale is not None and args.product_area is None:
        overrides["product_area"] = None  # the side range replaces the preset's area range
    if args.no_overlays:
        overrides.update(banner_probability=0.0, clutter=(0, 0))
    given = [f"--{n.replace('_', '-')}" for n in GEOMETRY if getattr(args, n) is not None]
    if args.regime == "mixed" and given:
        raise ValueError(f"{', '.join(given)} set one regime's geometry; --regime mixed draws the presets' geometry per scene")
    return regime_config(args.regime, **overrides)


def _compose(args) -> int:
    import os

    from eclip.data import CatalogError, load_catalog
    from eclip.data.compose import available_cores, compose_catalog, merge_parts

    if args.merge:
        try:
            catalog = merge_parts(args.out, args.world_size)
        except ValueError as error:
            print(f"eclip compose --merge: {error}", file=sys.stderr)
            return 1
        print(f"merged: {catalog}")
        return 0
    if not args.catalog:
        print("eclip compose: --catalog is required (or --merge to join the parts in --out)", file=sys.stderr)
        return 2
    # torchrun (or any launcher) sets RANK and WORLD_SIZE: each rank composes its share
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world_size = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    workers = args.workers or max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    try:
        config = _compose_config(args)
        if not 0 <= rank < world_size:
            raise ValueError(f"--rank {rank} is not in [0, --world-size {world_size})")
        if workers < 1:
            raise ValueError(f"--workers {workers} must be >= 1")
        products, _ = load_catalog(args.catalog)
    except (CatalogError, ValueError) as error:
        print(f"eclip compose: {error}", file=sys.stderr)
        return 1 if isinstance(error, CatalogError) else 2
    if args.limit is not None:
        products = products[: args.limit]
    result = compose_catalog(products, args.out, config, progress=not args.no_progress, workers=workers, rank=rank,
                             world_size=world_size, cache_mb=args.cache_mb)
    cores = f", {result.scenes_per_second / result.workers:.0f} per worker" if result.workers > 1 else ""
    print(f"{result.scenes} scenes of {result.products} products in {result.seconds:.1f} s "
          f"({result.scenes_per_second:.0f} scenes/s on {result.workers} workers{cores}): {result.catalog}")
    if world_size > 1:
        print(f"whole catalog: {result.merged}" if result.merged else f"rank {rank} of {world_size} done; the last rank merges the parts")
    if result.unreadable:
        print(f"{result.unreadable} products skipped: their photo does not decode", file=sys.stderr)
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _one_character(text: str) -> str:
    """argparse type: one character (a CSV delimiter); `\\t` is a tab."""
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1 or text in "\r\n\"":
        raise argparse.ArgumentTypeError(f"{text!r} is not one character (a quote or a newline cannot delimit)")
    return text


def _range(kind):
    """argparse type: 'LOW,HIGH' (or one value for both) -> (low, high)."""
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH ({kind.__name__}s)") from None
        if len(values) == 1:
            values *= 2
        if len(values) != 2 or values[0] > values[1]:
            raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH with LOW <= HIGH")
        return tuple(values)
    parse.__name__ = f"{kind.__name__} range"
    return parse


def _backgrounds(text: str) -> tuple[str, ...]:
    """argparse type: background kinds, comma-separated; classic, textures, photos, all name groups."""
    from eclip.data.compose import (
        BACKGROUNDS,
        CLASSIC_BACKGROUNDS,
        PHOTO_BACKGROUNDS,
        TEXTURE_BACKGROUNDS,
    )

    groups = {"classic": CLASSIC_BACKGROUNDS, "textures": TEXTURE_BACKGROUNDS, "photos": PHOTO_BACKGROUNDS, "all": BACKGROUNDS}
    kinds: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in groups and name not in BACKGROUNDS:
            raise argparse.ArgumentTypeError(f"unknown background {name!r}; known: {', '.join([*BACKGROUNDS, *groups])}")
        kinds += [k for k in groups.get(name, (name,)) if k not in kinds]
    if not kinds:
        raise argparse.ArgumentTypeError("no background kind given")
    return tuple(kinds)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in [0, 1]")
    return value


def _eval_scenes(args) -> int:
    from eclip.data import load_catalog
    from eclip.io import load_model
    from eclip.scene_eval import evaluate_scenes, scene_table

    model = load_model(args.model, device=args.device)
    scenes, _ = load_catalog(args.scenes)
    catalog, _ = load_catalog(args.catalog)
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
    results = evaluate_scenes(model, scenes, catalog, batch_size=args.batch_size, progress=not args.no_progress and not args.json, group_by=group_by,
                              readout=args.readout, grounding_map=args.grounding_map, tiles=args.tiles, hint_weight=args.hint_weight)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(t for t in (scene_table(results, g) for g in group_by) if t) or json.dumps(results, indent=2))
    return 0


def _shard(args) -> int:
    import os

    from eclip.data import CatalogError
    from eclip.data.shards import default_workers, merge_shards, write_shards

    try:
        if args.merge:
            report = merge_shards(args.out, progress=not args.no_progress)
        else:
            if not args.catalog:
                print("eclip shard: give --catalog (or --merge to merge the ranks' parts)", file=sys.stderr)
                return 2
            # torchrun's environment when --rank / --world-size are not given
            rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
            world_size = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
            workers = args.workers
            if workers is None:  # the machine's cores, shared by the ranks torchrun started on it
                workers = max(1, default_workers() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            report = write_shards(
                args.catalog, args.out, max_count=args.max_count, max_size_mb=args.max_size_mb,
                image_size=args.image_size, jpeg_quality=args.quality, seed=args.seed, progress=not args.no_progress,
                workers=workers, rank=rank, world_size=world_size,
            )
    except (CatalogError, ValueError) as error:
        print(f"eclip shard: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _serve(args) -> int:
    import os

    from .search.index import IndexFolderError
    from .search.serve import LOOPBACK_HOSTS, SearchService, ServeSettings, serve

    if args.model is None and args.onnx is None:
        print("eclip serve: give --model (PyTorch) or --onnx (an `eclip export --onnx` folder)", file=sys.stderr)
        return 2
    if args.read_timeout <= 0:
        print("eclip serve: --read-timeout must be positive", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("ECLIP_API_KEY") or None
    try:
        service = SearchService.load(args.model, args.index, onnx_folder=args.onnx, image_roots=args.image_root or None,
                                     threads=args.threads, device=None if args.onnx else args.device)
    except (IndexFolderError, FileNotFoundError, ValueError) as error:
        print(f"eclip serve: {error}", file=sys.stderr)
        return 1
    if args.allowed_hosts is not None:
        allowed = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    else:  # on loopback, only loopback names: a web page cannot reach it by DNS rebinding
        allowed = list(LOOPBACK_HOSTS) if args.host in LOOPBACK_HOSTS else None
    settings = ServeSettings(api_key=api_key, max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_pixels=args.max_pixels, max_k=args.max_k, read_timeout_s=args.read_timeout,
                             allowed_hosts=allowed)
    missing, checked, examples = service.missing_images()
    if missing:
        where = ", ".join(str(r) for r in service.image_roots[:3]) or "no folder"
        print(f"eclip serve: WARNING: {missing} of {checked} catalog images checked cannot be found (e.g. {examples[0]}; "
              f"looked under {where}): /image answers 404 for them and their results get no box. "
              "Give --image-root FOLDER, or re-run `eclip embed` and `eclip index`.", file=sys.stderr)
    auth = "API key required" if api_key else "no API key"
    where = "" if args.onnx else f" on {service.model.device}"
    print(f"serving {len(service.index)} products on http://{args.host}:{args.port} ({service.backend} encoder{where}, {auth})")
    serve(service, settings, host=args.host, port=args.port)
    return 0


def _export(args) -> int:
    from eclip.io import load_model

    from .search.export import ParityError, export_onnx

    if not args.onnx:
        print("eclip export: choose a format (--onnx)", file=sys.stderr)
        return 2
    try:
        report = export_onnx(load_model(args.model, device="cpu"), args.out, tolerance=args.tolerance)
    except ParityError as error:
        report = error.report
    for name, diff in report.max_abs_diff.items():
        print(f"{name:28s} max |onnx - torch| = {diff:.2e}")
    if not report.ok:
        print(f"eclip export: ONNX differs from PyTorch by more than {args.tolerance:g} "
              f"({', '.join(report.failures())}); nothing written to {report.folder}", file=sys.stderr)
        return 1
    files = sorted(p.name for p in report.folder.iterdir())
    print(f"exported to {report.folder} ({', '.join(files)})")
    return 0


def _push(args) -> int:
    from eclip.hub import HubError, push_folder

    try:
        url = push_folder(args.model_dir, args.repo_id, token=args.token, private=args.private, commit_message=args.message)
    except (HubError, FileNotFoundError) as error:
        print(f"eclip push: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.model_dir} (with its model card, README.md) to {args.repo_id}: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from eclip.version import __version__

    parser = argparse.ArgumentParser(prog="eclip", description="Instance-level multi-modal pretraining for e-commerce (ECLIP).")
    parser.add_argument("--version", action="version", version=f"eclip {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="ShopSynth -> train ECLIP and the CLIP baseline -> compare on held-out products")
    demo.add_argument("--out", default="runs/demo", help="report folder (report.md, results.json, PNGs)")
    demo.add_argument("--quick", action="store_true", help="a smaller run, under 3 minutes on 2 cores")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default: by size, fitted to --time-budget)")
    demo.add_argument(
        "--time-budget", type=float, default=None, metavar="MINUTES",
        help="the whole run's budget (default 15): it times a few steps at start and, on a machine too slow for the default "
             "steps, trains both models fewer (at least half); 0: the default steps whatever they take",
    )
    demo.add_argument("--products", type=int, default=None, help="ShopSynth products (default: by size)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--preset", default=None, help="model preset of both arms (default tiny-convnet; tiny is the ViT); larger presets are slow on a CPU")
    demo.add_argument(
        "--synth", action="append", default=[], metavar="FIELD=VALUE",
        help="ShopSynthConfig override, repeatable, e.g. --synth 'product_scale=[0.3,0.5]'",
    )
    _device_option(demo)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train on a catalog (JSON Lines)", formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="exit codes:\n" + "\n".join(f"  {code:<4} {words}" for code, words in TRAIN_EXIT_CODES.items()))
    tr.add_argument("--config", help="TOML or JSON file of TrainConfig fields (model_preset, objective, steps, model.*, loss.*, ...)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. --set steps=500 --set model.decoder.num_queries=16")
    tr.add_argument("--catalog", help="training catalog (overrides the config)")
    tr.add_argument("--shards", help="stream WebDataset shards instead (eclip shard): a folder, shards.json, a brace pattern or an fsspec URL")
    tr.add_argument("--out", help="run folder (overrides the config's out_dir)")
    tr.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    tr.add_argument("--val-catalog", help="held-out catalog evaluated during training (zero-shot, retrieval, grounding)")
    tr.add_argument("--val-scene-catalog", help="composed scenes of the val catalog's products: scene retrieval and grounding too")
    tr.add_argument("--val-every", type=int, help="evaluate every N steps and after the last (default 0: after the last only)")
    tr.add_argument("--report-to", action="append", choices=["wandb"], help="also log to Weights & Biases (needs wandb)")
    tr.add_argument("--no-progress", action="store_true")
    _device_option(tr, default=None)  # None: the config's device (auto unless set)
    tr.set_defaults(func=_train)

    cf = sub.add_parser("cache-features", help="compute the frozen tower prefixes of a training run once (feature_cache_dir)")
    cf.add_argument("--catalog", required=True, help="the training catalog (JSON Lines)")
    cf.add_argument("--out", required=True, help="the cache folder (memory-mapped .npy files and manifest.json); resumable")
    cf.add_argument("--config", help="the training run's TOML or JSON file (model, optim.freeze_*, seed)")
    cf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the training run's overrides, as for eclip train")
    cf.add_argument("--dtype", choices=["fp16", "fp32"], help="storage (default: the config's feature_cache_dtype)")
    cf.add_argument("--batch-size", type=int, default=64)
    _device_option(cf)
    cf.add_argument("--no-progress", action="store_true")
    cf.set_defaults(func=_cache_features)

    ev = sub.add_parser("eval", help="zero-shot evaluation of a saved model on a catalog")
    ev.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    ev.add_argument("--catalog", required=True, help="held-out catalog (JSON Lines)")
    ev.add_argument("--batch-size", type=int, default=128)
    _read_options(ev)
    _device_option(ev)
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
    fc = cat_sub.add_parser("from-csv", help="convert a product table (CSV) to a catalog; bad rows are reported, skipped and counted")
    fc.add_argument("csv", help="CSV file with a header row")
    fc.add_argument("--out", required=True, help="catalog to write (JSON Lines)")
    fc.add_argument("--id-column", default="id")
    fc.add_argument("--title-column", default="productDisplayName")
    fc.add_argument("--image-template", default="images/{id}.jpg", help="image path from the row's columns; relative to --image-root")
    fc.add_argument("--image-root", default=None, help="folder of relative image paths (default: the CSV's folder)")
    fc.add_argument("--category-column", default=None)
    fc.add_argument("--attribute-columns", default=None, help="comma-separated columns kept as attributes, e.g. baseColour,gender,usage")
    fc.add_argument("--limit", type=_positive_int, default=None, help="read at most N data rows")
    fc.add_argument("--delimiter", type=_one_character, default=",", help="one character; \\t or tab for a tab")
    fc.add_argument("--encoding", default="utf-8", help="the table's text encoding, e.g. cp1252 or latin-1 (default utf-8; "
                    "a UTF-8 or UTF-16 byte-order mark is honoured); lines that do not decode are reported and skipped")
    fc.add_argument("--relative-paths", action="store_true", help="write image paths relative to the catalog's folder (default: absolute)")
    fc.set_defaults(func=_from_csv)

    co = sub.add_parser("compose", help="cluttered multi-product scenes with true boxes from a catalog of clean product photos")
    co.add_argument("--catalog", help="catalog of clean photos on a white background (first image of each product)")
    co.add_argument("--out", required=True, help="folder: images/, catalog.jsonl (K scenes per product, boxes), compose.json")
    co.add_argument("--scenes-per-product", type=int, default=3)
    co.add_argument("--size", type=int, default=224, help="scene side in pixels")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--keep-clean", action="store_true", help="also list each product's clean photo (for training; not for scene evaluation)")
    co.add_argument("--limit", type=int, default=None, help="the first N products only")
    co.add_argument("--workers", type=int, default=None, help="processes (default: all cores, divided by torchrun's LOCAL_WORLD_SIZE)")
    co.add_argument("--rank", type=int, default=None, help="compose this share of the products (default: $RANK, else 0)")
    co.add_argument("--world-size", type=int, default=None, help="shares in all (default: $WORLD_SIZE, else 1); parts merge into catalog.jsonl")
    co.add_argument("--merge", action="store_true", help="only join catalog.part-R-of-W.jsonl in --out into catalog.jsonl")
    co.add_argument("--cache-mb", type=float, default=1024, help="memory for cut-outs, all workers together")
    scene = co.add_argument_group("scene regime (flags override the regime's preset)")
    scene.add_argument("--regime", choices=["large", "medium", "small", "mixed"], default="large",
                       help="large: product 40-75%% of the side, 1-5 distractors (the default); medium: 12-30%% of the area; "
                            "small: 2-15%% of the area among 2-4 larger distractors; mixed: one of them per scene")
    scene.add_argument("--product-scale", type=_range(float), default=None, metavar="LOW,HIGH", help="product's longer side / scene side")
    scene.add_argument("--product-area", type=_range(float), default=None, metavar="LOW,HIGH", help="product's box area / scene area (replaces --product-scale)")
    scene.add_argument("--distractors", type=_range(int), default=None, metavar="LOW,HIGH", help="distractor products per scene")
    scene.add_argument("--distractor-scale", type=_range(float), default=None, metavar="LOW,HIGH", help="a distractor's longer side / scene side")
    scene.add_argument("--occluder-probability", type=_probability, default=None, metavar="P", help="one distractor in front of the product (0.4)")
    scene.add_argument("--max-occlusion", type=_probability, default=None, metavar="P", help="most of the product's pixels hidden (0.3)")
    scene.add_argument("--banner-probability", type=_probability, default=None, metavar="P", help="promo banners in a scene (0.6)")
    scene.add_argument("--banners", type=_range(int), default=None, metavar="LOW,HIGH", help="promo words when there are any (1,2)")
    scene.add_argument("--clutter", type=_range(int), default=None, metavar="LOW,HIGH", help="lines and confetti (0,4)")
    scene.add_argument("--no-overlays", action="store_true", help="no banners, no clutter")
    scene.add_argument("--backgrounds", type=_backgrounds, default=None, metavar="KINDS",
                       help="comma-separated: solid, gradient, blotches, stripes, tiles (= classic, the default), noise, fabric, wood "
                            "(= textures), photo, mosaic (= photos: blurred crops of catalog photos), or all")
    scene.add_argument("--camera", dest="camera_probability", type=_probability, default=None, metavar="P",
                       help="probability of sensor noise, blur and JPEG artefacts on the whole scene (0)")
    scene.add_argument("--people", dest="people_probability", type=_probability, default=None, metavar="P",
                       help="probability of one more distractor: a catalog photo that shows a person (0)")
    co.add_argument("--no-progress", action="store_true")
    co.set_defaults(func=_compose)

    es = sub.add_parser("eval-scenes", help="scene-to-catalog retrieval (mAP@10, R@1, R@10) and grounding in composed scenes")
    es.add_argument("--model", required=True, help="model folder")
    es.add_argument("--scenes", required=True, help="scene catalog (eclip compose's catalog.jsonl)")
    es.add_argument("--catalog", required=True, help="clean catalog of the same products (the gallery)")
    es.add_argument("--batch-size", type=int, default=128)
    es.add_argument("--group-by", default="area,distractors,occlusion,regime", help="metric tables by these scene groupings, comma separated, from area, distractors, occlusion, regime (default: all four)")
    es.add_argument("--tiles", type=int, default=0, metavar="N",
                    help="also read each scene as N x N overlapping crops plus the whole (scene_to_catalog_tiled_*, scene_grounding_tiled_*); 0: whole scenes only")
    es.add_argument("--hint-weight", type=_probability, default=0.25, help="weight of the category hint in the hinted query (0..1)")
    es.add_argument("--json", action="store_true", help="print every metric, grouped ones included, as JSON")
    _read_options(es)
    _device_option(es)
    es.add_argument("--no-progress", action="store_true")
    es.set_defaults(func=_eval_scenes)

    sh = sub.add_parser("shard", help="write a catalog as product-grouped WebDataset shards (+ shards.json) for streaming")
    sh.add_argument("--catalog", help="catalog (JSON Lines)")
    sh.add_argument("--out", required=True, help="shard folder: shard-000000.tar, ... and shards.json")
    sh.add_argument("--max-count", type=int, default=None, help="products per shard at most")
    sh.add_argument("--max-size-mb", type=float, default=None, help="shard file size at most, in MB of 10^6 bytes (default 256 when no --max-count)")
    sh.add_argument("--image-size", type=int, default=None, help="resize images to SxS and re-encode as JPEG (default: copy the files as they are)")
    sh.add_argument("--quality", type=int, default=90, help="JPEG quality with --image-size")
    sh.add_argument("--seed", type=int, default=0, help="seed of the product order (shuffled across shards)")
    sh.add_argument("--workers", type=int, default=None, help="processes encoding images (default: one per core); the output does not depend on it")
    sh.add_argument("--rank", type=int, default=None, help="this process's share of the products (default: RANK from torchrun, else 0)")
    sh.add_argument("--world-size", type=int, default=None, help="processes sharing the catalog (default: WORLD_SIZE from torchrun, else 1); "
                    "each writes a part under OUT/.parts and the one that completes the set merges them into the shards")
    sh.add_argument("--merge", action="store_true", help="merge the ranks' parts under OUT/.parts into shards + shards.json (needs only --out)")
    sh.add_argument("--no-progress", action="store_true")
    sh.set_defaults(func=_shard)

    se = sub.add_parser("serve", help="HTTP search service and web page over a model and a product index")
    se.add_argument("--model", help="model folder (PyTorch); or give --onnx")
    se.add_argument("--onnx", help="an `eclip export --onnx` folder: encode with onnxruntime instead of PyTorch")
    se.add_argument("--index", required=True, help="product index folder (eclip index)")
    se.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--api-key", default=None, help="require this key (X-API-Key or Authorization: Bearer); prefer the ECLIP_API_KEY variable, a flag shows in `ps`")
    se.add_argument("--max-upload-mb", type=float, default=8.0, help="largest request body")
    se.add_argument("--max-pixels", type=int, default=16_000_000, help="largest uploaded image, width x height")
    se.add_argument("--max-k", type=int, default=100, help="most results per query")
    se.add_argument("--image-root", action="append", default=[], help="folder /image may serve from (default: the folders of the index's images)")
    se.add_argument("--threads", type=int, default=1, help="intra-op threads per request (requests run in parallel)")
    se.add_argument("--read-timeout", type=float, default=60.0, help="seconds a request body may take to arrive (408 after)")
    se.add_argument("--allowed-hosts", default=None,
                    help="comma-separated Host names answered ('*' any, '*.example.com' subdomains); default: "
                         "localhost,127.0.0.1,::1 when bound to loopback, any otherwise")
    _device_option(se)
    se.set_defaults(func=_serve)

    pu = sub.add_parser("push", help="upload a model folder with its model card to the Hugging Face Hub",
                        description="Writes the model card (README.md: towers, training, evaluation, licence) into the folder "
                                    "and uploads config.json, model.safetensors, README.md and eval_results.json to the "
                                    "hub model repository, created if missing. Needs a login (`huggingface-cli login`) or --token.")
    pu.add_argument("model_dir", help="model folder (config.json + model.safetensors)")
    pu.add_argument("repo_id", help="hub repository, org/name")
    pu.add_argument("--token", default=None, help="hub token (default: the login's; prefer HF_TOKEN, a flag shows in `ps`)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--message", default="Upload eclip model", help="commit message")
    pu.set_defaults(func=_push)

    ex = sub.add_parser("export", help="export the image and text encoders (ONNX), checked against PyTorch")
    ex.add_argument("--model", required=True, help="model folder")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--onnx", action="store_true", help="ONNX (the only format so far)")
    ex.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch| on random inputs (graph outputs, scores, grounding maps); above it nothing is written")
    ex.set_defaults(func=_export)

    from .search.commands import add_search_commands  # embed, index, search (imports are lazy)

    add_search_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print the resume command
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
