"""Grounding and same-product retrieval study of the demo models (issue 2).

Loads the ECLIP and CLIP models that `eclip demo` saved and measures, on a sample of TRAIN-split
products (never the held-out split), how the box rule, the map that is boxed and the product
embedding change grounding and same-product retrieval. Nothing is retrained.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/grounding_study.py            # train-split tables
    HF_HUB_OFFLINE=1 .venv/bin/python tools/grounding_study.py --heldout  # library evaluation

`--heldout` runs the library's `eclip.evaluation.evaluate` once per model on the held-out
catalog, boxing with each model's rule (`ModelConfig.box_rule()`), and prints it next to the
numbers of the last demo (runs/demo/results.json). Choose rules from the train tables only.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from eclip.data import ImageStore, load_catalog
from eclip.data.transforms import normalize
from eclip.evaluation import ranks_metrics
from eclip.io import load_model
from eclip.model.eclip import ECLIP, select_instances
from eclip.model.grounding import box_iou, peak_point

THRESHOLDS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MASSES = (0.5, 0.6, 0.7, 0.8, 0.9)
MEANS = (0.5, 1.0, 1.5, 2.0, 3.0)
COMPONENTS = ("largest", "peak", "union")
# Rule families, each with its parameter values. minmax: the map rescaled to [0, 1] (what the
# library's upsample_heatmap returns), pixels >= t; max: the raw map, pixels >= t * max (an
# attention map is a distribution with a floor, which then counts); mass: the highest pixels of
# the min-max map that together hold a fraction q of its total; mean: pixels of the min-max map
# >= c times its mean (for an attention map, c = 1 is roughly "more than a uniform share")
FAMILIES = {"minmax": THRESHOLDS, "max": THRESHOLDS, "mass": MASSES, "mean": MEANS}

Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------- box rules


def boxes_from_map(heatmap: np.ndarray) -> dict[tuple[str, float, str], Box]:
    """Every candidate rule's box for one upsampled, not yet normalised map (H, W)."""
    h, w = heatmap.shape
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    out: dict[tuple[str, float, str], Box] = {}
    minmax = (heatmap - heatmap.min()) / max(float(heatmap.max() - heatmap.min()), 1e-12)
    ordered = np.sort(minmax.ravel())[::-1]
    cumulative = np.cumsum(ordered) / max(float(ordered.sum()), 1e-12)
    for norm, params in FAMILIES.items():
        for t in params:
            if norm == "minmax":
                mask = minmax >= t
            elif norm == "max":
                mask = heatmap >= t * heatmap.max()
            elif norm == "mean":
                mask = minmax >= min(t * float(minmax.mean()), 1.0)
            else:  # the smallest set of top pixels holding a fraction t of the mass
                mask = minmax >= ordered[min(int(np.searchsorted(cumulative, t)), len(ordered) - 1)]
            labels, count = ndimage.label(mask)
            if count == 0:
                for comp in COMPONENTS:
                    out[norm, t, comp] = (0.0, 0.0, 1.0, 1.0)
                continue
            sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
            chosen = {
                "largest": labels == int(np.argmax(sizes)) + 1,
                "peak": labels == labels[peak],
                "union": mask,
            }
            for comp, region in chosen.items():
                ys, xs = np.nonzero(region)
                out[norm, t, comp] = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    return out


def upsample_raw(maps: torch.Tensor, size: int) -> np.ndarray:
    """(B, h, w) -> (B, S, S) bilinear, values kept (the library's upsample also min-max
    normalises; here the normalisation is one of the rules)."""
    up = F.interpolate(maps.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False)
    return up.squeeze(1).numpy()


# ----------------------------------------------------------------------------- maps


def decoder_layer_attention(model: ECLIP, images: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's cross-attention (heads averaged, over the image tokens,
    renormalised), (B, M, h, w) per layer: the decoder's own forward, every layer asked for
    its weights. The last entry equals `encode_image(...).attention`."""
    decoder = model.decoder
    assert decoder is not None
    features = model.vision.forward_features(images)
    tokens = features.level(model.config.decoder.memory_level)
    b, n, _ = tokens.shape
    memory = decoder.memory_norm(decoder.memory_proj(tokens))
    pos = decoder.position_encoding(features.grid, memory)
    if decoder.registers.shape[0]:
        memory = torch.cat([memory, decoder.registers.expand(b, -1, -1)], dim=1)
        pos = torch.cat([pos, pos.new_zeros(decoder.registers.shape)], dim=0)
    x = decoder.queries.unsqueeze(0).expand(b, -1, -1)
    maps = []
    for layer in decoder.layers:
        x, weights = layer(x, memory, pos, need_weights=True)
        weights = weights[..., :n]
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        maps.append(weights.unflatten(-1, features.grid))
    return maps


def eclip_maps(model: ECLIP, images: torch.Tensor, titles: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Candidate grid maps (B, h, w) for ECLIP, and its text-free product embeddings."""
    enc = model.encode_image(images)
    layers = decoder_layer_attention(model, images)
    torch.testing.assert_close(layers[-1], enc.attention)  # the study reads the library's maps
    rows = torch.arange(len(images))
    sims = torch.einsum("bmd,bd->bm", enc.instances, titles)
    index = sims.argmax(dim=-1)
    # the model's own selection (softmax at its temperature) of each image's own title
    _, weights = select_instances(enc.instances, titles, model.config.selection, model.config.selection_temperature)
    weights = weights[rows, rows]  # (B, M)
    productness = enc.productness.softmax(dim=-1)
    layer_mean = torch.stack(layers).mean(dim=0)  # (B, M, h, w)
    maps = {
        "selected (current)": enc.attention[rows, index],
        "selection-weighted": torch.einsum("bm,bmhw->bhw", weights, enc.attention),
        "productness-weighted": torch.einsum("bm,bmhw->bhw", productness, enc.attention),
        "mean of queries": enc.attention.mean(dim=1),
        "selected, layer mean": layer_mean[rows, index],
        "selected, layer 1": layers[0][rows, index],
    }
    g = enc.global_embedding
    inst_p = F.normalize(torch.einsum("bm,bmd->bd", productness, enc.instances), dim=-1)
    inst_mean = F.normalize(enc.instances.mean(dim=1), dim=-1)
    top = enc.instances[rows, enc.productness.argmax(dim=-1)]
    embeddings = {
        "global only": g,
        "productness-weighted instances (current)": model.product_embedding_from(enc),
        "top-productness instance": top,
        "mean of instances": inst_mean,
        "global + productness inst. (concat)": F.normalize(torch.cat([g, inst_p], dim=-1), dim=-1),
        "global + mean inst. (concat)": F.normalize(torch.cat([g, inst_mean], dim=-1), dim=-1),
        "mean(global, productness inst.)": F.normalize(g + inst_p, dim=-1),
    }
    torch.testing.assert_close(embeddings["productness-weighted instances (current)"], inst_p)
    return maps, embeddings


def clip_maps(model: ECLIP, images: torch.Tensor, titles: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    enc = model.encode_image(images)
    maps, _ = model.heatmaps_from(enc, titles)
    return {"token similarity (current)": maps}, {"global only (current)": enc.global_embedding}


# ----------------------------------------------------------------------------- study


def sample_products(path: Path, count: int, seed: int):
    products, _ = load_catalog(path)
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(products)), min(count, len(products))))
    return [products[i] for i in picked]


@torch.no_grad()
def study(model: ECLIP, products, make: Callable, batch_size: int = 100) -> tuple[dict, dict, dict]:
    """Per map variant and rule: IoUs, pointing hits; per embedding variant: embeddings."""
    store = ImageStore(products, model.image_size)
    slots = [(p, i) for p, product in enumerate(products) for i in range(len(product.images))]
    titles = model.encode_text([p.title for p in products])
    ious: dict[str, dict[tuple, list[float]]] = {}
    extra: dict[str, dict[str, list[float]]] = {}
    embeddings: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(slots), batch_size):
        chunk = slots[start : start + batch_size]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        own = titles[torch.tensor([p for p, _ in chunk])]
        maps, embs = make(model, images, own)
        for name, emb in embs.items():
            embeddings.setdefault(name, []).append(emb)
        for name, grid_maps in maps.items():
            up = upsample_raw(grid_maps, images.shape[-1])
            per_rule = ious.setdefault(name, {})
            stats = extra.setdefault(name, {"pointing": [], "mass_in_box": [], "box_area": []})
            for (p, i), heat in zip(chunk, up):
                truth = products[p].images[i].box
                if truth is None:
                    continue
                for rule, box in boxes_from_map(heat).items():
                    per_rule.setdefault(rule, []).append(box_iou(box, truth))
                    if rule == ("minmax", 0.5, "largest"):  # the library's current rule
                        stats.setdefault("pred_area_current", []).append((box[2] - box[0]) * (box[3] - box[1]))
                x, y = peak_point(heat)
                stats["pointing"].append(float(truth[0] <= x <= truth[2] and truth[1] <= y <= truth[3]))
                h, w = heat.shape
                m = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
                x0, y0, x1, y1 = (round(truth[0] * w), round(truth[1] * h), round(truth[2] * w), round(truth[3] * h))
                stats["mass_in_box"].append(float(m[y0:y1, x0:x1].sum() / max(m.sum(), 1e-12)))
                stats["box_area"].append((truth[2] - truth[0]) * (truth[3] - truth[1]))
    pids = np.array([p for p, _ in slots])
    return ious, extra, {name: (torch.cat(v).numpy(), pids) for name, v in embeddings.items()}


def same_product(emb: np.ndarray, pids: np.ndarray) -> dict[str, float]:
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    same = pids[:, None] == pids[None, :]
    np.fill_diagonal(same, False)
    queries = same.any(axis=1)
    out = ranks_metrics(sims[queries], same[queries])
    return {"map_r": out["map_r"], "r1": out["r1"]}


def summarise(name: str, ious: dict, extra: dict) -> tuple[tuple, float]:
    """Print a table per map variant; return that model's best (map, rule) and its Acc@0.5."""
    best: tuple = ()
    best_key = (-1.0, -1.0)
    print(f"\n## {name}: grounding on the train sample\n")
    print("| map | pointing | mass in true box (min-max map) | true box area | current-rule box area |")
    print("|---|---|---|---|---|")
    for map_name, stats in extra.items():
        print(f"| {map_name} | {np.mean(stats['pointing']):.3f} | {np.mean(stats['mass_in_box']):.3f} | "
              f"{np.mean(stats['box_area']):.3f} | {np.mean(stats['pred_area_current']):.3f} |")
    for map_name, per_rule in ious.items():
        print(f"\n### {name}, map: {map_name} (Acc@IoU0.5 / mean IoU)\n")
        for norm, params in FAMILIES.items():
            header = " | ".join(f"{dict(mass='q', mean='c').get(norm, 't')}={t}" for t in params)
            print(f"| {norm}, region | {header} |")
            print("|---|" + "---|" * len(params))
            for comp in COMPONENTS:
                cells = []
                for t in params:
                    values = np.array(per_rule[norm, t, comp])
                    acc, miou = float((values >= 0.5).mean()), float(values.mean())
                    cells.append(f"{acc:.3f} / {miou:.3f}")
                    if (acc, miou) > best_key:
                        best_key, best = (acc, miou), (map_name, norm, t, comp)
                print(f"| {norm}, {comp} | " + " | ".join(cells) + " |")
            print()
    print(f"\n{name} best on train: map {best[0]!r}, {best[1]} normalisation, threshold {best[2]}, "
          f"{best[3]} region: Acc@IoU0.5 {best_key[0]:.3f}, mean IoU {best_key[1]:.3f}")
    return best, best_key[0]


def run_train_study(args) -> None:
    products = sample_products(args.data / "train.jsonl", args.products, args.seed)
    print(f"train sample: {len(products)} products, {sum(len(p.images) for p in products)} images (seed {args.seed})")
    results = {}
    for name, make in (("eclip", eclip_maps), ("clip", clip_maps)):
        begin = time.time()
        model = load_model(args.runs / name / "model")
        ious, extra, embeddings = study(model, products, make)
        best, _ = summarise(name, ious, extra)
        print(f"\n## {name}: same-product retrieval on the train sample\n")
        print("| product embedding | mAP@R | R@1 |")
        print("|---|---|---|")
        for emb_name, (emb, pids) in embeddings.items():
            sp = same_product(emb, pids)
            print(f"| {emb_name} | {sp['map_r']:.3f} | {sp['r1']:.3f} |")
        results[name] = best
        print(f"\n({name}: {time.time() - begin:.0f} s)")
    print("\nbest rules on train:", json.dumps({k: list(v) for k, v in results.items()}))


def run_heldout(args) -> None:
    import eclip.evaluation as evaluation

    old = json.loads((args.runs / "results.json").read_text())
    heldout, _ = load_catalog(args.data / "heldout.jsonl")
    keys = ["grounding_acc50", "grounding_mean_iou", "grounding_pointing", "same_product_map_r", "same_product_r1"]
    new = {}
    for name in ("eclip", "clip"):
        model = load_model(args.runs / name / "model")
        print(f"{name}: box rule {model.config.box_rule()}")
        new[name] = evaluation.evaluate(model, heldout, progress=False)  # boxes by the model's rule
    print("\n## held-out (library evaluation)\n")
    print("| metric | eclip before | eclip after | clip before | clip after |")
    print("|---|---|---|---|---|")
    for key in keys:
        print(f"| {key} | {old['eclip'][key]:.3f} | {new['eclip'][key]:.3f} | {old['clip'][key]:.3f} | {new['clip'][key]:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=None, help="default: RUNS/data")
    parser.add_argument("--products", type=int, default=500, help="train products sampled (3 images each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", action="store_true", help="evaluate once on the held-out split")
    args = parser.parse_args()
    args.data = args.data or args.runs / "data"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.heldout:
        run_heldout(args)
    else:
        run_train_study(args)


if __name__ == "__main__":
    main()
