"""How to read a scene query when the product is small: the whole photo or tiles of it, one
vector or the best of several, on validation products only.

    python -m experiments.small_products.readouts --work runs/small_products --eclip DIR --clip DIR

Reads the validation scenes `experiments.small_products.small_products` composed in `--work`
(same arguments: the split and scenes are rebuilt from the same seed and reused) and two
trained model folders. For each regime's validation scenes it scores the clean catalog photos
with several query readouts:

- `whole`: the product embedding of the whole scene (what `eclip search --image` does);
- `whole, any instance` (ECLIP): every decoder instance of the scene is a query vector and a
  catalog product scores its best match (a multi-vector query: "which products are in the photo");
- `tiles`: the whole scene plus overlapping crops (`--grid` per side), each resized to the
  model's input, each one query vector (ECLIP: product embedding; CLIP: global), best match;
- `tiles, any instance` (ECLIP): every instance of every crop;
- hinted (category text, weight `--hint-weights`): the instance (ECLIP) or crop (CLIP) the hint
  matches best over the whole scene and its crops, mixed with the hint as
  `eclip.retrieval.image_text_query` mixes them;
- grounding from the title inside the crop the title matches best, the box mapped back;
- zero-shot classification and text search on the clean photos under each readout (ECLIP).

Prints one table per regime. A study: it decides whether the library gets a tiled query.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eclip.data import ImageStore, Product
from eclip.data.transforms import normalize
from eclip.evaluation import evaluate, ranks_metrics
from eclip.io import load_model
from eclip.model import ECLIP
from eclip.model.grounding import box_iou, peak_point, upsample_heatmap
from eclip.scene_eval import HINT_TEMPLATE
from eclip.tiling import best_match_scores, box_in_image, crop_tiles, tile_boxes
from experiments.small_products.small_products import parse_args as experiment_args
from experiments.small_products.small_products import prepare

logger = logging.getLogger("eclip.experiments.readouts")
CLEAN_KEYS = ("classification_top1", "classification_macro_f1", "attribute_baseColour_top1", "text_to_product_r10", "linear_probe_category_top1")


@torch.no_grad()
def study(model: ECLIP, scenes: list[Product], clean: list[Product], grid: int, hint_weights: list[float], batch: int) -> dict:
    decoder = model.config.has_decoder
    boxes = tile_boxes(grid)
    n_crops = len(boxes)
    catalog_index = {p.product_id: i for i, p in enumerate(clean)}
    store = ImageStore(clean, model.image_size)
    gallery = torch.cat([
        model.product_embedding(normalize(torch.stack([store.get(p, 0) for p in range(s, min(s + batch, len(clean)))])))
        for s in range(0, len(clean), batch)
    ]).float()
    slots = [(p, 0) for p in range(len(scenes))]
    relevant = np.array([catalog_index[scenes[p].product_id] for p, _ in slots])[:, None] == np.arange(len(clean))[None]
    hints = {c: model.encode_text(HINT_TEMPLATE.format(c))[0] for c in {p.category for p in scenes}}
    titles = model.encode_text([p.title for p in scenes])
    scene_store = ImageStore(scenes, model.image_size)
    scores: dict[str, list[np.ndarray]] = {}
    ious: dict[str, list[float]] = {"whole": [], "best crop": []}
    points: dict[str, list[bool]] = {"whole": [], "best crop": []}
    per_image = max(1, batch // n_crops)
    for start in range(0, len(slots), per_image):
        chunk = slots[start : start + per_image]
        encoding = model.encode_image(crop_tiles(normalize(torch.stack([scene_store.get(p, i) for p, i in chunk])), boxes))
        b = len(chunk)
        product = model.product_embedding_from(encoding).float().view(b, n_crops, -1)
        reads = {"whole": product[:, :1], "tiles": product}
        if decoder:
            instances = encoding.instances.float().view(b, n_crops, model.config.decoder.num_queries, -1)
            reads["whole, any instance"] = instances[:, 0]
            reads["tiles, any instance"] = instances.flatten(1, 2)
        for name, vectors in reads.items():
            scores.setdefault(name, []).append(best_match_scores(vectors, gallery).numpy())
        hint = torch.stack([hints[scenes[p].category] for p, _ in chunk]).float()  # (b, D)
        title = titles[[p for p, _ in chunk]].float()
        for where, candidates in (("whole", slice(0, 1)), ("tiles", slice(0, n_crops))):
            # the hint picks an instance (ECLIP) or a crop's global vector (CLIP)
            pool = (instances[:, candidates].flatten(1, 2) if decoder else encoding.global_embedding.float().view(b, n_crops, -1)[:, candidates])
            pick = pool[torch.arange(b), torch.einsum("bvd,bd->bv", pool, hint).argmax(dim=1)]
            for w in hint_weights:
                query = F.normalize((1 - w) * pick + w * hint, dim=-1)
                scores.setdefault(f"hinted {where}, w={w:g}", []).append((query @ gallery.T).numpy())
        # grounding: the whole scene, and the crop whose text score for the title is highest
        maps, _ = model.heatmaps_from(encoding, title.repeat_interleave(n_crops, dim=0))
        heat = upsample_heatmap(maps, (model.image_size, model.image_size)).numpy().reshape(b, n_crops, model.image_size, model.image_size)
        text_scores = model.image_text_scores(encoding, title).float().view(b, n_crops, b)  # crop of image k vs title j
        for k, (p, i) in enumerate(chunk):
            truth = scenes[p].images[i].box
            if truth is None:
                continue
            best = int(text_scores[k, :, k].argmax())
            for name, c in (("whole", 0), ("best crop", best)):
                box = box_in_image(model.box_from_heatmap(heat[k, c]), boxes[c])
                ious[name].append(box_iou(box, truth))
                px, py = peak_point(heat[k, c])
                x0, y0, x1, y1 = boxes[c]
                px, py = x0 + px * (x1 - x0), y0 + py * (y1 - y0)
                points[name].append(truth[0] <= px <= truth[2] and truth[1] <= py <= truth[3])
    out = {name: ranks_metrics(np.concatenate(parts), relevant, ks=(1, 10)) for name, parts in scores.items()}
    for name in ious:
        out[f"grounding {name}"] = {"acc50": float(np.mean(np.array(ious[name]) >= 0.5)), "mean_iou": float(np.mean(ious[name])),
                                    "pointing": float(np.mean(points[name]))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eclip", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--hint-weights", default="0,0.25,0.5")
    p.add_argument("--threads", type=int, default=2)
    own, rest = p.parse_known_args()
    args = experiment_args(rest + ["--validation-only", "--no-progress"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("eclip.data").setLevel(logging.WARNING)
    torch.set_num_threads(own.threads)
    data = prepare(args, Path(args.work))
    weights = [float(w) for w in own.hint_weights.split(",")]
    results = {}
    for arm, folder in (("eclip", own.eclip), ("clip", own.clip)):
        model = load_model(folder).eval()
        clean = data["clean"]["validation"]
        for readout in (("instance", "global", "mix") if model.config.has_decoder else ("global",)):
            m = evaluate(model, clean, batch_size=args.eval_batch, progress=False, readout=readout, grounding_map=None)
            results[f"{arm}/clean/{readout}"] = {k: m.get(k) for k in CLEAN_KEYS}
        for regime, scenes in data["scenes"]["validation"].items():
            results[f"{arm}/{regime}"] = study(model, scenes, data["clean"]["validation"], own.grid, weights, args.eval_batch)
            logger.info("%s %s done", arm, regime)
    out = Path(args.work) / f"readouts_grid{own.grid}.json"
    out.write_text(json.dumps(results, indent=2))
    for key, table in results.items():
        if "/clean/" in key:
            print(f"\n{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in table.items() if v is not None))
            continue
        print(f"\n{key}\n| readout | mAP@10 | R@1 | R@10 |\n|---|---|---|---|")
        for name, m in table.items():
            if name.startswith("grounding"):
                print(f"| {name} | Acc@IoU0.5 {m['acc50']:.3f} | mean IoU {m['mean_iou']:.3f} | pointing {m['pointing']:.3f} |")
            else:
                print(f"| {name} | {m['map10']:.3f} | {m['r1']:.3f} | {m['r10']:.3f} |")
    print(f"\n{out}")


if __name__ == "__main__":
    main()
