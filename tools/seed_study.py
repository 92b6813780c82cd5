"""How much of an ECLIP-vs-CLIP difference is the training seed? (issue 2)

Evaluates models trained on the same catalog with different training seeds (initial weights and
batch order; `eclip train --set seed=N`) with the demo's protocol (`eclip.evaluation.evaluate`
on the held-out catalog) and prints each run and the mean and spread per arm and readout. Nothing
is chosen from these numbers: the protocol, the readouts and the box rules were fixed before.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/seed_study.py --catalog runs/demo/data/heldout.jsonl \\
        --model eclip@0=runs/demo/eclip/model --model eclip@1=runs/seeds/eclip_seed1/model \\
        --model clip@0=runs/demo/clip/model --model clip@1=runs/seeds/clip_seed1/model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eclip.data import load_catalog  # noqa: E402
from eclip.evaluation import evaluate  # noqa: E402
from eclip.io import load_model  # noqa: E402

COLUMNS = [
    ("same-product mAP@R", "same_product_map_r"),
    ("text→product R@10", "text_to_product_r10"),
    ("category top-1", "classification_top1"),
    ("colour top-1", "attribute_colour_top1"),
    ("grounding Acc@IoU0.5", "grounding_acc50"),
    ("pointing game", "grounding_pointing"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="ARM@SEED=DIR")
    parser.add_argument("--catalog", type=Path, required=True, help="the evaluation catalog")
    parser.add_argument("--readouts", default="instance,mix", help="readouts of decoder models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    products, _ = load_catalog(args.catalog)

    runs: dict[str, dict] = {}
    for spec in args.model:
        name, folder = spec.split("=", 1)
        model = load_model(folder).eval()
        readouts = args.readouts.split(",") if model.config.has_decoder else ["global"]
        for readout in readouts:
            model.config.readout = readout
            runs[f"{name}, {readout}"] = evaluate(model, products, progress=False)
            print(f"{name}, {readout} done", flush=True)

    shown = [(t, k) for t, k in COLUMNS if any(k in r for r in runs.values())]
    header = "| run | " + " | ".join(t for t, _ in shown) + " |\n|---|" + "---|" * len(shown)
    print("\n" + header)
    for name, row in runs.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for _, k in shown) + " |")
    groups: dict[str, list[dict]] = {}
    for name, row in runs.items():
        arm_seed, readout = name.split(", ")
        groups.setdefault(f"{arm_seed.split('@')[0]}, {readout}", []).append(row)
    print("\nmean ± sd over seeds (n runs)\n\n" + header.replace("| run |", "| arm, readout |"))
    summary = {}
    for group, rows in groups.items():
        cells, summary[group] = [], {}
        for _, key in shown:
            values = [r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[group][key] = {"mean": statistics.mean(values), "sd": sd, "values": values}
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {group} (n={len(rows)}) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
