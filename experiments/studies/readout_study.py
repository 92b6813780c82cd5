"""Which readout should a trained ECLIP serve? (`ModelConfig.readout`)

Loads trained models and evaluates each with every readout through the library's own evaluation
(`eclip.evaluation.evaluate`, and `eclip.scene_eval.evaluate_scenes` where scenes are given), on
a sample of TRAINING products only: the held-out split must not choose the readout.

- instance: productness-weighted instances as the product embedding, text-guided instance
  selection as the image-text score (the paper's reading);
- global: the global head for both (what the CLIP baseline reads);
- mix: the two unit vectors summed (product embedding) and the two scores averaged.

ShopSynth (the demo's models; catalog images are listing photos with the true box):

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/studies/readout_study.py \\
        --model eclip=runs/demo/eclip/model --model clip=runs/demo/clip/model \\
        --catalog runs/demo/data/train.jsonl --products 500

Myntra (experiments/real_catalog/real_catalog.py's models; each training product holds its composed scenes and, last,
its clean photo): zero-shot and text retrieval on the clean photos, scene-to-catalog retrieval
and grounding on the scenes:

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/studies/readout_study.py \\
        --model eclip=runs/bench_myntra/eclip/model --model clip=runs/bench_myntra/clip/model \\
        --catalog runs/bench_myntra/train_scenes/catalog.jsonl --scenes --products 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from eclip.config import READOUTS  # noqa: E402
from eclip.data import load_catalog  # noqa: E402
from eclip.evaluation import evaluate  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.scene_eval import evaluate_scenes  # noqa: E402

COLUMNS = [
    ("category top-1", "classification_top1"),
    ("text→product R@10", "text_to_product_r10"),
    ("same-product mAP@R", "same_product_map_r"),
    ("scene→catalog mAP@10", "scene_to_catalog_map10"),
    ("scene→catalog R@1", "scene_to_catalog_r1"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--catalog", type=Path, required=True, help="a TRAINING catalog")
    parser.add_argument("--products", type=int, default=500, help="training products sampled")
    parser.add_argument("--scenes", action="store_true",
                        help="products hold scenes then their clean photo (experiments/real_catalog/real_catalog.py's train_scenes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    products, _ = load_catalog(args.catalog)
    rng = random.Random(args.seed)
    products = [products[i] for i in sorted(rng.sample(range(len(products)), min(args.products, len(products))))]
    if args.scenes:
        clean = [dataclasses.replace(p, images=p.images[-1:]) for p in products]
        scenes = [dataclasses.replace(p, images=p.images[:-1]) for p in products]
    else:
        clean, scenes = products, None
    print(f"{args.catalog}: {len(products)} training products sampled (seed {args.seed})")

    results = evaluate_readouts(args.model, READOUTS, clean, scenes)
    attributes = sorted({k for r in results.values() for k in r if k.startswith("attribute_") and k.endswith("_top1")})
    shown = [(k.removeprefix("attribute_").removesuffix("_top1") + " top-1", k) for k in attributes]
    print("\n" + markdown_table(results, COLUMNS[:1] + shown + COLUMNS[1:], "model, readout"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def evaluate_readouts(specs: list[str], readouts, products, scenes=None) -> dict[str, dict]:
    """{"NAME, readout": metrics} for each NAME=DIR model and each readout (a model without a
    decoder: "global" only), by `evaluate` (and `evaluate_scenes` without grounding)."""
    results: dict[str, dict] = {}
    for spec in specs:
        name, folder = spec.split("=", 1)
        model = load_model(folder).eval()
        for readout in readouts if model.config.has_decoder else ("global",):
            begin = time.time()
            row = evaluate(model, products, progress=False, readout=readout)
            if scenes is not None:
                row |= evaluate_scenes(model, scenes, products, progress=False, ground=False, readout=readout)
            results[f"{name}, {readout}"] = row
            print(f"{name}, {readout}: {time.time() - begin:.0f} s", flush=True)
    return results


def markdown_table(rows: dict[str, dict], columns: list[tuple[str, str]], first: str) -> str:
    """The columns (title, key) that some row has; a row's missing key is an empty cell."""
    shown = [(title, key) for title, key in columns if any(key in r for r in rows.values())]
    lines = [f"| {first} | " + " | ".join(t for t, _ in shown) + " |", "|---|" + "---|" * len(shown)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[k]) if k in row else "" for _, k in shown) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
