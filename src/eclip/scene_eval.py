"""Scene-to-catalog evaluation (DESIGN.md, Downstream tasks and metrics), Product1M-style.

Each scene (a cluttered image holding the product, e.g. from `eclip compose`) is a query; the
gallery is the clean catalog images of all the products under evaluation. A hit is a gallery
image of the scene's product. Both sides are embedded with `model.product_embedding`, the
text-free product vector (for the CLIP baseline, the global embedding). The same pass grounds
each scene's product from its title (`model.ground`) against its true box.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from .data.catalog import Product
from .data.dataset import ImageStore
from .data.transforms import normalize
from .evaluation import random_box_baseline, ranks_metrics
from .model.eclip import ECLIP
from .model.grounding import box_iou, peak_point

logger = logging.getLogger("eclip.evaluation")


@torch.no_grad()
def _embed(model: ECLIP, store: ImageStore, slots: list[tuple[int, int]], batch_size: int, desc: str, progress: bool, readout: str | None = None) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(slots), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = slots[start : start + batch_size]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        out.append(model.product_embedding(images, readout).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_scenes(
    model: ECLIP,
    scene_products: list[Product],
    catalog_products: list[Product],
    batch_size: int = 128,
    progress: bool = True,
    ground: bool = True,
    readout: str | None = None,
    grounding_map: str | None = None,
) -> dict[str, float]:
    """Scene-to-catalog retrieval (mAP@10, R@1, R@10) and grounding (Acc@IoU0.5, mean IoU,
    pointing game, with their random floors). Products are matched by product_id; a scene whose
    product is not in the catalog has no right answer and is left out (counted). `readout` and
    `grounding_map`: how a decoder model is read (default: its config's)."""
    model.eval()
    catalog_index = {p.product_id: i for i, p in enumerate(catalog_products)}
    gallery = [(p, i) for p, product in enumerate(catalog_products) for i in range(len(product.images))]
    gallery_pid = np.array([p for p, _ in gallery])
    scenes = [(p, i) for p, product in enumerate(scene_products) if product.product_id in catalog_index for i in range(len(product.images))]
    unmatched = sum(1 for p in scene_products if p.product_id not in catalog_index)
    if unmatched:
        logger.warning("%d scene products are not in the catalog; their scenes are left out", unmatched)
    if not scenes:
        raise ValueError("no scene belongs to a catalog product: nothing to evaluate")
    scene_pid = np.array([catalog_index[scene_products[p].product_id] for p, _ in scenes])

    scene_store = ImageStore(scene_products, model.image_size)
    gallery_emb = _embed(model, ImageStore(catalog_products, model.image_size), gallery, batch_size, "catalog", progress, readout)
    scene_emb = _embed(model, scene_store, scenes, batch_size, "scenes", progress, readout)

    relevant = scene_pid[:, None] == gallery_pid[None, :]
    metrics = ranks_metrics(scene_emb @ gallery_emb.T, relevant, ks=(1, 10))
    results: dict[str, float] = {
        "num_scenes": len(scenes),
        "num_gallery": len(gallery),
        "scene_unmatched_products": unmatched,
        "scene_to_catalog_map10": metrics["map10"],
        "scene_to_catalog_r1": metrics["r1"],
        "scene_to_catalog_r10": metrics["r10"],
    }
    if ground:
        results |= _grounding(model, scene_products, scene_store, scenes, batch_size, progress, grounding_map)
    return results


def _grounding(model: ECLIP, products: list[Product], store: ImageStore, scenes: list[tuple[int, int]], batch_size: int, progress: bool, grounding_map: str | None = None) -> dict[str, float]:
    boxed = [(p, i) for p, i in scenes if products[p].images[i].box is not None]
    if not boxed:
        return {}
    ious, points = [], []
    for start in tqdm(range(0, len(boxed), batch_size), desc="grounding", unit="batch", disable=not progress, leave=False):
        chunk = boxed[start : start + batch_size]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        result = model.ground(images, [products[p].title for p, _ in chunk], grounding_map)
        heatmaps = result.heatmaps.float().cpu().numpy()
        for (p, i), predicted, heatmap in zip(chunk, result.boxes, heatmaps):
            box = products[p].images[i].box
            ious.append(box_iou(predicted, box))
            x, y = peak_point(heatmap)
            points.append(box[0] <= x <= box[2] and box[1] <= y <= box[3])
    boxes = [products[p].images[i].box for p, i in boxed]
    acc_random, iou_random = random_box_baseline(boxes)
    return {
        "scene_grounding_acc50": float(np.mean(np.array(ious) >= 0.5)),
        "scene_grounding_mean_iou": float(np.mean(ious)),
        "scene_grounding_pointing": float(np.mean(points)),
        "scene_grounding_acc50_random_box": acc_random,
        "scene_grounding_mean_iou_random_box": iou_random,
        # a point drawn uniformly lands in the box with probability = its area
        "scene_grounding_pointing_random": float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])),
    }
