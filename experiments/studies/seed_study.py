"""How much of an ECLIP-vs-CLIP difference is the training seed?

Evaluates models trained on the same catalog with different training seeds (initial weights and
batch order; `eclip train --set seed=N`) with the demo's protocol (`eclip.evaluation.evaluate`
on the held-out catalog) and prints each run and the mean and spread per arm and readout. Nothing
is chosen from these numbers: the protocol, the readouts and the box rules were fixed before.

    HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.studies.seed_study --catalog runs/demo/data/heldout.jsonl \\
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
from experiments.studies.readout_study import evaluate_readouts, markdown_table  # noqa: E402

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
    runs = evaluate_readouts(args.model, args.readouts.split(","), products)
    print("\n" + markdown_table(runs, COLUMNS, "run"))

    groups: dict[str, list[dict]] = {}
    for name, row in runs.items():
        arm_seed, readout = name.split(", ")
        groups.setdefault(f"{arm_seed.split('@')[0]}, {readout}", []).append(row)
    summary: dict[str, dict] = {}
    cells: dict[str, dict] = {}
    for group, rows in groups.items():
        summary[group], cells[f"{group} (n={len(rows)})"] = {}, {}
        for _, key in COLUMNS:
            values = [r[key] for r in rows if key in r]
            if not values:
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[group][key] = {"mean": statistics.mean(values), "sd": sd, "values": values}
            cells[f"{group} (n={len(rows)})"][key] = f"{statistics.mean(values):.3f} ± {sd:.3f}"
    print("\nmean ± sd over seeds (n runs)\n\n" + markdown_table(cells, COLUMNS, "arm, readout"))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
