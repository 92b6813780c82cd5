"""Which map grounds the product in a composed scene, for one trained model.

Reads a scene catalog (e.g. the Myntra benchmark's *validation* scenes, never the held-out
ones) and, for every scene, boxes several maps of the model with several box rules against the
scene's true box. Nothing is retrained.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/studies/scene_grounding_study.py \
        --model runs/bench_myntra_tokens/eclip/model --scenes runs/bench_myntra/validation_scenes/catalog.jsonl

Maps (each over the token grid, for image i and its title t):
- attention: the cross-attention of the query the title selects (the library's ECLIP map);
- contribution: that attention times each projected token's dot product with the title,
  a_n (t . W x_n): with `decoder.instance_features="tokens"` the instance score is the sum of
  these terms over the tokens (before the instance's normalisation), so the map says which
  tokens made the match (`grounding_map="contribution"`);
- similarity: the title's cosine with each projected token (the baseline's MaskCLIP-style map);
- productness attention: the attention of the query productness picks, no title needed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eclip.config import GROUNDING_MAPS, BoxRule  # noqa: E402
from eclip.data import ImageStore, load_catalog  # noqa: E402
from eclip.data.transforms import normalize  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.model.eclip import ECLIP  # noqa: E402
from eclip.model.grounding import box_by_rule, box_iou, peak_point, upsample_heatmap  # noqa: E402

RULES = {
    "mean, largest": BoxRule("mean", 1.0, "largest"),
    "mean x1.5, largest": BoxRule("mean", 1.5, "largest"),
    "max 0.5, largest": BoxRule("max", 0.5, "largest"),
    "max 0.8, union": BoxRule("max", 0.8, "union"),
}


@torch.no_grad()
def maps_for(model: ECLIP, images: torch.Tensor, titles: list[str]) -> dict[str, torch.Tensor]:
    """Every candidate map (B, h, w) for image i and title i: the library's maps
    (`ModelConfig.grounding_map`), and the attention of the query productness picks."""
    encoding = model.encode_image(images)
    texts = model.encode_text(titles)  # (B, D)
    out = {}
    for name in GROUNDING_MAPS if encoding.attention is not None else ("similarity",):
        out[name] = model.heatmaps_from(encoding, texts, name)[0]
    if encoding.attention is not None:
        out["productness attention"] = encoding.attention[torch.arange(len(images)), encoding.productness.argmax(-1)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a saved model folder")
    p.add_argument("--scenes", required=True, help="a composed scene catalog with boxes (not the held-out one)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(Path(args.model)).eval()
    products, _ = load_catalog(Path(args.scenes))
    slots = [(p, i) for p, product in enumerate(products) for i, image in enumerate(product.images) if image.box is not None]
    store = ImageStore(products, model.image_size)
    ious: dict[tuple[str, str], list[float]] = {}
    points: dict[str, list[bool]] = {}
    for start in range(0, len(slots), args.batch_size):
        chunk = slots[start : start + args.batch_size]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        maps = maps_for(model, images, [products[p].title for p, _ in chunk])
        for name, grid_maps in maps.items():
            heatmaps = upsample_heatmap(grid_maps, tuple(images.shape[-2:])).numpy()
            for (p, i), heatmap in zip(chunk, heatmaps):
                box = products[p].images[i].box
                x, y = peak_point(heatmap)
                points.setdefault(name, []).append(box[0] <= x <= box[2] and box[1] <= y <= box[3])
                for rule_name, rule in RULES.items():
                    ious.setdefault((name, rule_name), []).append(box_iou(box_by_rule(heatmap, rule), box))
    print(f"{args.model} on {len(slots)} scenes of {args.scenes}")
    print("| map | pointing game | " + " | ".join(f"Acc@IoU0.5, {r}" for r in RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for name in points:
        accs = " | ".join(f"{np.mean(np.array(ious[(name, r)]) >= 0.5):.3f}" for r in RULES)
        print(f"| {name} | {np.mean(points[name]):.3f} | {accs} |")


if __name__ == "__main__":
    main()
