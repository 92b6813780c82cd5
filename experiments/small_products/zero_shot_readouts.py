"""Zero-shot category, linear probe and text-to-product retrieval of trained models under every
readout, on the clean photos of `small_products.py`'s validation products.

    PYTHONPATH=src python -m experiments.small_products.zero_shot_readouts --work runs/sp \\
        runs/sp/eclip_320/model runs/sp/clip_320/model

Writes `--work/zero_shot_readouts.json` and prints one line per model and readout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eclip.data import load_catalog  # noqa: E402
from eclip.evaluation import evaluate  # noqa: E402
from eclip.io import load_model  # noqa: E402

KEYS = ("classification_top1", "classification_macro_f1", "linear_probe_category_top1", "text_to_product_r10")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model folders")
    p.add_argument("--work", default="runs/sp", help="small_products.py's work folder (validation.jsonl)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clean, _ = load_catalog(Path(args.work) / "validation.jsonl")
    out = {}
    for folder in args.models:
        model = load_model(folder).eval()
        readouts = ["instance", "global", "mix"] if model.config.decoder is not None else ["global"]
        for readout in readouts:
            metrics = evaluate(model, clean, batch_size=64, progress=False, readout=readout)
            out[f"{folder}:{readout}"] = {k: round(metrics[k], 3) for k in KEYS}
            print(folder, readout, out[f"{folder}:{readout}"], flush=True)
    (Path(args.work) / "zero_shot_readouts.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
