"""Tiles by the product's size: the 3 x 3 crops only where the whole photo says the product is small.

    PYTHONPATH=src python -m experiments.small_products.adaptive_tiles --work runs/sp \\
        --model eclip=runs/sp/eclip_320/model --model clip=runs/sp/clip_320/model

Reads `small_products.py`'s validation products (clean photos and the `small` and `large`
scenes) from `--work`. Each scene is encoded once as the pyramid of tiles (whole, 2 x 2, 3 x 3:
`eclip.tiling.tile_boxes((2, 3))`). The product's share of the photo is estimated without text
or labels: the model's own text-free product vector grounds itself in the whole photo
(`heatmaps_from` with that vector as the text, boxed by the model's rule). Per scene it keeps
the rank of the true product when the query is the grid-2 tiles and when it is the pyramid,
text-free and hinted with the category; then, for each threshold on the estimated share, the
reading "pyramid where the estimate is below it, grid 2 elsewhere" is scored per regime.
Writes `--work/adaptive_tiles.json` and prints the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eclip.data import ImageStore, load_catalog  # noqa: E402
from eclip.data.transforms import normalize  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.model.grounding import box_iou, upsample_heatmap  # noqa: E402
from eclip.scene_eval import HINT_TEMPLATE  # noqa: E402
from eclip.tiling import (  # noqa: E402
    best_match_scores,
    crop_tiles,
    tile_boxes,
    tiled_hinted_vectors,
    tiled_product_vectors,
)

GRID2 = len(tile_boxes(2))  # the whole photo and the 2 x 2 crops come first in the pyramid
THRESHOLDS = [0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.30, 1.01]


def ap10(scores: np.ndarray, truth: int) -> tuple[int, float]:
    """Rank (1-based) of the true gallery item and its AP@10 (one relevant item)."""
    rank = int((scores > scores[truth]).sum()) + 1
    return rank, (1.0 / rank if rank <= 10 else 0.0)


@torch.no_grad()
def read_scenes(model, scenes, gallery, gallery_index, hint_weight: float, batch: int) -> dict[str, np.ndarray]:
    boxes = tile_boxes((2, 3))
    store = ImageStore(scenes, model.image_size)
    slots = [(p, i) for p, product in enumerate(scenes) for i in range(len(product.images))]
    categories = sorted({p.category for p in scenes if p.category})
    hints = dict(zip(categories, model.encode_text([HINT_TEMPLATE.format(c) for c in categories])))
    out = {k: [] for k in ("estimate", "true_area", "self_iou", "ap_grid2", "ap_pyramid", "hinted_ap_grid2", "hinted_ap_pyramid")}
    for start in range(0, len(slots), batch):
        chunk = slots[start : start + batch]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        encoding = model.encode_image(crop_tiles(images, boxes))
        vectors = tiled_product_vectors(model, encoding, len(chunk))  # (B, T, D)
        texts = torch.stack([hints[scenes[p].category] for p, _ in chunk])
        hinted = tiled_hinted_vectors(model, encoding, texts, hint_weight)
        whole = encoding.take(list(range(0, len(chunk) * len(boxes), len(boxes))))
        maps, _ = model.heatmaps_from(whole, vectors[:, 0])  # the photo's own product vector grounds itself
        heat = upsample_heatmap(maps, tuple(images.shape[-2:])).float().numpy()
        for b, (p, i) in enumerate(chunk):
            box = model.box_from_heatmap(heat[b])
            truth_box = scenes[p].images[i].box
            out["estimate"].append((box[2] - box[0]) * (box[3] - box[1]))
            out["true_area"].append((truth_box[2] - truth_box[0]) * (truth_box[3] - truth_box[1]))
            out["self_iou"].append(box_iou(box, truth_box))
            truth = gallery_index[scenes[p].product_id]
            for prefix, v in (("", vectors[b : b + 1]), ("hinted_", hinted[b : b + 1])):
                out[f"{prefix}ap_grid2"].append(ap10(best_match_scores(v[:, :GRID2], gallery)[0].numpy(), truth)[1])
                out[f"{prefix}ap_pyramid"].append(ap10(best_match_scores(v, gallery)[0].numpy(), truth)[1])
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/sp")
    p.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER")
    p.add_argument("--regimes", default="small,large")
    p.add_argument("--hint-weight", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=8, help="scenes per batch (each is 14 tiles)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    clean, _ = load_catalog(work / "validation.jsonl")
    gallery_index = {product.product_id: k for k, product in enumerate(clean)}
    report: dict = {"thresholds": THRESHOLDS}
    for entry in args.model:
        name, folder = entry.split("=", 1)
        model = load_model(folder).eval()
        gallery_store = ImageStore(clean, model.image_size)
        with torch.no_grad():
            gallery = torch.cat([
                model.product_embedding(normalize(torch.stack([gallery_store.get(k, 0) for k in range(s, min(s + 64, len(clean)))])))
                for s in range(0, len(clean), 64)
            ])
        per_regime = {}
        for regime in args.regimes.split(","):
            scenes, _ = load_catalog(work / f"validation_{regime}_scenes" / "catalog.jsonl")
            per_regime[regime] = read_scenes(model, scenes, gallery, gallery_index, args.hint_weight, args.batch)
        rows = {}
        for t in THRESHOLDS:
            row = {}
            for regime, r in per_regime.items():
                use = r["estimate"] < t
                for prefix in ("", "hinted_"):
                    row[f"{regime} {prefix}mAP@10"] = float(np.where(use, r[f"{prefix}ap_pyramid"], r[f"{prefix}ap_grid2"]).mean())
                row[f"{regime} pyramid share"] = float(use.mean())
            rows[t] = row
        estimate_vs_truth = {regime: float(np.corrcoef(r["estimate"], r["true_area"])[0, 1]) for regime, r in per_regime.items()}
        report[name] = {"sweep": {str(t): v for t, v in rows.items()}, "estimate_truth_correlation": estimate_vs_truth,
                        "median_estimate": {k: float(np.median(r["estimate"])) for k, r in per_regime.items()},
                        "median_true_area": {k: float(np.median(r["true_area"])) for k, r in per_regime.items()}}
        print(f"\n{name}: estimated share against the true share, correlation {estimate_vs_truth}")
        columns = list(next(iter(rows.values())))
        print("| threshold | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for t, row in rows.items():
            print(f"| {t} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
        (work / "adaptive_tiles.json").write_text(json.dumps(report, indent=2))  # after each model: a stopped run keeps it


if __name__ == "__main__":
    main()
