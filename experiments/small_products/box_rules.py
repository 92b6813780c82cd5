"""Which box rule turns each model's grounding map into the best box, on validation scenes of
every regime (`small_products.BOX_RULES`, Acc@IoU0.5 per regime and their mean).

    python -m experiments.small_products.box_rules --work runs/small_products --models MODEL_DIR [MODEL_DIR ...]

Reads the validation scenes `experiments.small_products.small_products` composed in `--work`
(same arguments: the split and scenes are rebuilt from the same seed and reused) and trained
model folders; prints one row per model and rule (Acc@IoU0.5 per regime and the median ratio
of the rule's box area to the true box's), and the oracle row (each scene's best rule: what
choosing the threshold per scene could reach). A study: it decides the box rule a preset
ships with (`ModelConfig.box`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from eclip.io import load_model
from experiments.small_products.small_products import (
    BOX_RULES,
    ORACLE,
    SHIPPABLE_RULES,
    box_rule_sweep,
    prepare,
)
from experiments.small_products.small_products import parse_args as experiment_args

logger = logging.getLogger("eclip.experiments.box_rules")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # an option, not a positional: a positional would take the experiment's option values
    # (`--work runs/sp`) that parse_known_args leaves for the experiment's own parser
    p.add_argument("--models", nargs="+", required=True, help="trained model folders")
    p.add_argument("--out", default=None, help="JSON of the sweeps (default: WORK/box_rules.json)")
    args, rest = p.parse_known_args(argv)
    exp = experiment_args(rest + ["--validation-only"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if exp.threads > 0:
        torch.set_num_threads(exp.threads)
    scenes = prepare(exp, Path(exp.work))["scenes"]["validation"]
    sweeps, areas = {}, {}
    for folder in args.models:
        model = load_model(folder).eval()
        areas[folder] = {}
        sweeps[folder] = box_rule_sweep(model, scenes, exp.eval_batch, areas[folder])
        logger.info("%s done", folder)
    regimes = list(scenes)
    area_columns = " | ".join(f"{r}: box / true area" for r in regimes)
    print("| model | rule | " + " | ".join(regimes) + " | mean | " + area_columns + " |\n|---|---|" + "---|" * (2 * len(regimes) + 1))
    for folder, sweep in sweeps.items():
        best = max(SHIPPABLE_RULES, key=lambda name: np.mean([sweep[r][name] for r in regimes]))
        for name in [*BOX_RULES, ORACLE]:
            cells = [f"{sweep[r][name]:.3f}" for r in regimes]
            mark = " **best**" if name == best else ""
            ratio = " | ".join("-" if name == ORACLE else f"{areas[folder][r][name]:.2f}" for r in regimes)
            print(f"| {folder} | {name}{mark} | " + " | ".join(cells) + f" | {np.mean([sweep[r][name] for r in regimes]):.3f} | {ratio} |")
    out = Path(args.out or Path(exp.work) / "box_rules.json")
    out.write_text(json.dumps({"acc50": sweeps, "median_area_ratio": areas}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
