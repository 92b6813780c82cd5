"""Scene-to-catalog evaluation (docs/design.md, "Downstream tasks and metrics"), Product1M-style.

Each scene (a cluttered image holding the product, e.g. from `eclip compose`) is a query; the
gallery is the clean catalog images of all the products under evaluation. A hit is a gallery
image of the scene's product. Both sides are embedded with the model's product embedding, the
text-free product vector (for the CLIP baseline, the global embedding). With several products in
the scene a text-free vector cannot know which one is meant, so the scenes also query with a
hint, the product's category (`HINT_TEMPLATE`, never the title), as `eclip search --image
--text` does (`eclip.retrieval.image_text_query`). The same encoding of each scene grounds its
product from its title against its true box.

Every metric is also reported by group, so that a result says where it holds: by the product's
share of the scene's area, by the number of distractors, by occlusion and by the composer's
regime name (keys `by_<grouping>/<group>/<metric>`, each group with its `num_scenes`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data.catalog import Product, ProductImage
from .data.dataset import ImageStore
from .data.transforms import normalize
from .evaluation import (
    encoded_batches,
    ground_encoded,
    grounding_metrics,
    point_in_box,
    ranks_metrics,
)
from .model.eclip import ECLIP
from .model.grounding import box_iou, peak_point
from .retrieval import image_text_query
from .tiling import (
    crop_tiles,
    ground_tiled_from,
    tile_boxes,
    tile_grids,
    tiled_hinted_vectors,
    tiled_product_vectors,
)

logger = logging.getLogger("eclip.evaluation")

HINT_TEMPLATE = "a photo of a {}"  # filled with the scene product's category
GROUPINGS = ("area", "distractors", "occlusion", "regime")
# bucket edges: a value v is in bucket k when edges[k-1] <= v < edges[k]
AREA_EDGES = (0.10, 0.25)  # the product's share of the scene: small, medium, large
DISTRACTOR_EDGES = (2, 4)  # other products in the scene: 0-1, 2-3, 4+
OCCLUSION_EDGES = (0.01, 0.15)  # hidden share of the product: none, some, much

# the rows of `scene_table` unless told otherwise
TABLE_METRICS = (
    "scene_to_catalog_map10",
    "scene_to_catalog_r1",
    "scene_to_catalog_hinted_map10",
    "scene_to_catalog_hinted_r1",
    "scene_grounding_acc50",
    "scene_grounding_acc50_random_box",
    "scene_grounding_pointing",
    "scene_grounding_pointing_random",
    "scene_to_catalog_tiled_map10",
    "scene_to_catalog_tiled_hinted_map10",
    "scene_grounding_tiled_acc50",
    "scene_grounding_tiled_pointing",
)


def bucket_names(edges: Sequence[float], percent: bool) -> list[str]:
    """Names of the len(edges) + 1 buckets: "<10%", "10-25%", ">=25%" for fractions, "0-1",
    "2-3", "4+" for counts."""
    if list(edges) != sorted(edges) or len(set(edges)) != len(edges):
        raise ValueError(f"bucket edges must be strictly increasing, got {tuple(edges)}")
    if percent:
        pct = [f"{100 * e:g}" for e in edges]
        return [f"<{pct[0]}%"] + [f"{a}-{b}%" for a, b in zip(pct, pct[1:])] + [f">={pct[-1]}%"]
    bounds = [0, *(int(e) for e in edges)]
    names = [f"{a}" if b - 1 == a else f"{a}-{b - 1}" for a, b in zip(bounds, bounds[1:])]
    return names + [f"{bounds[-1]}+"]


def _bucket(value: float, edges: Sequence[float], names: list[str]) -> str:
    return names[int(np.searchsorted(np.asarray(edges), value, side="right"))]


def scene_groups(
    image: ProductImage,
    area_edges: Sequence[float] = AREA_EDGES,
    distractor_edges: Sequence[int] = DISTRACTOR_EDGES,
    occlusion_edges: Sequence[float] = OCCLUSION_EDGES,
) -> dict[str, str]:
    """grouping -> group of one scene, from what its catalog entry says (`eclip compose`'s
    `area`, `distractors`, `occlusion`, `regime`); the area falls back to the box's. A grouping
    the entry has nothing for is left out."""
    meta = image.metadata
    out = {}
    area = meta.get("area")
    if not isinstance(area, (int, float)) and image.box is not None:
        x0, y0, x1, y1 = image.box
        area = (x1 - x0) * (y1 - y0)
    if isinstance(area, (int, float)):
        out["area"] = _bucket(area, area_edges, bucket_names(area_edges, percent=True))
    if isinstance(meta.get("distractors"), list):
        out["distractors"] = _bucket(len(meta["distractors"]), distractor_edges, bucket_names(distractor_edges, percent=False))
    if isinstance(meta.get("occlusion"), (int, float)):
        out["occlusion"] = _bucket(meta["occlusion"], occlusion_edges, bucket_names(occlusion_edges, percent=True))
    if meta.get("regime") is not None:
        out["regime"] = str(meta["regime"])
    return out


@torch.no_grad()
def evaluate_scenes(
    model: ECLIP,
    scene_products: list[Product],
    catalog_products: list[Product],
    batch_size: int = 128,
    progress: bool = True,
    ground: bool = True,
    hint: bool = True,
    hint_template: str = HINT_TEMPLATE,
    hint_weight: float = 0.25,
    group_by: Sequence[str] = GROUPINGS,
    area_edges: Sequence[float] = AREA_EDGES,
    distractor_edges: Sequence[int] = DISTRACTOR_EDGES,
    occlusion_edges: Sequence[float] = OCCLUSION_EDGES,
    readout: str | None = None,
    grounding_map: str | None = None,
    tiles: int | Sequence[int] = 0,
    scene_store: ImageStore | None = None,
    catalog_store: ImageStore | None = None,
) -> dict[str, float]:
    """Scene-to-catalog retrieval (mAP@10, R@1, R@10), text-free and hinted with the category
    (`scene_to_catalog_hinted_*`, scenes whose product has a category), and grounding
    (Acc@IoU0.5, mean IoU, pointing game, with their random floors), overall and by group
    (`group_by`, buckets by the edges). Each scene goes through the image tower once.
    tiles >= 2 also reads each scene as tiles (`eclip.tiling`, the whole scene and tiles x
    tiles crops, in the same pass; several grids, e.g. (2, 3): the crops of each): `scene_to_catalog_tiled_*`, `scene_to_catalog_tiled_hinted_*`
    and `scene_grounding_tiled_*`.
    Products are matched by product_id; a scene whose product is not in the catalog has no
    right answer and is left out (counted). readout and grounding_map, when given, are passed
    to the model's methods (else its config decides). scene_store and catalog_store: the
    images already decoded at the model's size (a caller that evaluates again keeps them)."""
    unknown = set(group_by) - set(GROUPINGS)
    if unknown:
        raise ValueError(f"unknown grouping {sorted(unknown)}; choose from {GROUPINGS}")
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

    gallery_store = catalog_store or ImageStore(catalog_products, model.image_size)
    gallery_emb = torch.cat([
        model.product_embedding_from(encoding, readout).float().cpu()
        for _, _, encoding in encoded_batches(model, gallery_store, gallery, batch_size, "catalog", progress)
    ]).numpy()

    # texts, each encoded once: the titles (grounding) and the category hints (retrieval)
    scene_of = sorted({p for p, _ in scenes})
    title_list = [scene_products[p].title for p in scene_of] if ground else []
    titles = {}
    for start in range(0, len(title_list), batch_size):
        titles |= dict(zip(scene_of[start : start + batch_size], model.encode_text(title_list[start : start + batch_size])))
    categories = sorted({scene_products[p].category for p in scene_of if scene_products[p].category is not None}) if hint else []
    hints = dict(zip(categories, model.encode_text([hint_template.format(c) for c in categories]))) if categories else {}

    boxes = [scene_products[p].images[i].box if ground else None for p, i in scenes]
    tile_list = tile_boxes(tiles) if tile_grids(tiles) else None
    per_batch = max(1, batch_size // len(tile_list)) if tile_list else batch_size
    queries: dict[str, list[torch.Tensor]] = {"": [], "hinted_": []} | ({"tiled_": [], "tiled_hinted_": []} if tile_list else {})
    found = {prefix: (np.full(len(scenes), np.nan), np.full(len(scenes), np.nan)) for prefix in (["", "tiled_"] if tile_list else [""])}
    store = scene_store or ImageStore(scene_products, model.image_size)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(scenes), per_batch), desc="scenes", unit="batch", disable=not progress, leave=False):
        chunk = scenes[start : start + per_batch]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk])).to(device)
        encoding = model.encode_image(crop_tiles(images, tile_list) if tile_list else images)
        # tile 0 is the whole scene: the untiled reading comes from the same pass
        whole = encoding.take(list(range(0, len(chunk) * len(tile_list), len(tile_list)))) if tile_list else encoding
        queries[""].append(model.product_embedding_from(whole, readout).float().cpu()[:, None])
        hinted = [k for k, (p, _) in enumerate(chunk) if scene_products[p].category in hints]
        if hinted:
            texts = torch.stack([hints[scene_products[chunk[k][0]].category] for k in hinted])
            query = image_text_query(model, whole.take(hinted), texts, hint_weight, readout=readout)
            queries["hinted_"].append(query.float().cpu()[:, None])
        if tile_list:
            queries["tiled_"].append(tiled_product_vectors(model, encoding, len(chunk), readout).float().cpu())
            if hinted:
                rows = [k * len(tile_list) + t for k in hinted for t in range(len(tile_list))]
                queries["tiled_hinted_"].append(tiled_hinted_vectors(model, encoding.take(rows), texts, hint_weight, readout).float().cpu())
        chunk_boxes = boxes[start : start + len(chunk)]
        boxed = [k for k, box in enumerate(chunk_boxes) if box is not None]
        if ground and boxed:
            texts = torch.stack([titles[p] for p, _ in chunk])
            ious, points = ground_encoded(model, whole, tuple(images.shape[-2:]), texts, chunk_boxes, grounding_map)
            found[""][0][start + np.array(boxed)], found[""][1][start + np.array(boxed)] = ious, points
            if tile_list:
                grounding = ground_tiled_from(model, encoding, tile_list, texts, tuple(images.shape[-2:]), grounding_map)
                for k in boxed:
                    found["tiled_"][0][start + k] = box_iou(grounding.boxes[k], chunk_boxes[k])
                    found["tiled_"][1][start + k] = point_in_box(peak_point(grounding.heatmaps[k].numpy()), chunk_boxes[k])

    has_hint = np.array([scene_products[p].category in hints for p, _ in scenes], dtype=bool)
    per_scene = _PerScene(
        queries={name: torch.cat(parts).numpy() for name, parts in queries.items() if parts},
        has_hint=has_hint,
        gallery_emb=gallery_emb,
        relevant=scene_pid[:, None] == gallery_pid[None, :],
        found=found,
        boxes=boxes,
    )
    results: dict[str, float] = {"num_scenes": len(scenes), "num_gallery": len(gallery), "scene_unmatched_products": unmatched}
    results |= per_scene.metrics(np.arange(len(scenes)))
    groups = [scene_groups(scene_products[p].images[i], area_edges, distractor_edges, occlusion_edges) for p, i in scenes]
    for grouping in group_by:
        names = _group_order(grouping, groups, area_edges, distractor_edges, occlusion_edges)
        for name in names:
            rows = np.array([k for k, g in enumerate(groups) if g.get(grouping) == name], dtype=int)
            if len(rows):
                for key, value in per_scene.metrics(rows).items():
                    results[f"by_{grouping}/{name}/{key}"] = value
    return results


def _group_order(grouping: str, groups: list[dict[str, str]], area_edges, distractor_edges, occlusion_edges) -> list[str]:
    """The groups of one grouping in bucket order (regimes by name)."""
    if grouping == "area":
        return bucket_names(area_edges, percent=True)
    if grouping == "distractors":
        return bucket_names(distractor_edges, percent=False)
    if grouping == "occlusion":
        return bucket_names(occlusion_edges, percent=True)
    return sorted({g[grouping] for g in groups if grouping in g})


class _PerScene:
    """What one pass recorded per scene, and the metrics of any subset of the scenes.
    queries: metric prefix -> (scenes, V, D) query vectors, a gallery item scoring its best
    match among a scene's V ("hinted" sets hold the scenes with a hint only); found: prefix ->
    (IoU, pointing hit) per scene, NaN where the scene has no box."""

    def __init__(self, queries, has_hint, gallery_emb, relevant, found, boxes):
        self.queries, self.has_hint, self.gallery_emb, self.relevant = queries, has_hint, gallery_emb, relevant
        self.hinted_row = np.cumsum(has_hint) - 1  # scene -> its row in a hinted set
        self.found, self.boxes = found, boxes

    def metrics(self, rows: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {"num_scenes": len(rows)}
        hinted = rows[self.has_hint[rows]]
        for prefix, vectors in self.queries.items():
            subset, picked = (hinted, self.hinted_row[hinted]) if "hinted" in prefix else (rows, rows)
            if not len(subset):
                continue
            scores = np.einsum("qvd,gd->qvg", vectors[picked], self.gallery_emb).max(axis=1)
            m = ranks_metrics(scores, self.relevant[subset], ks=(1, 10))
            out |= {f"scene_to_catalog_{prefix}map10": m["map10"], f"scene_to_catalog_{prefix}r1": m["r1"],
                    f"scene_to_catalog_{prefix}r10": m["r10"]}
            if prefix == "hinted_":
                out["num_hinted_scenes"] = len(subset)
        boxed = [r for r in rows if self.boxes[r] is not None]
        for prefix, (ious, points) in self.found.items():
            metrics = grounding_metrics([float(ious[r]) for r in boxed], [bool(points[r]) for r in boxed], [self.boxes[r] for r in boxed], "")
            out |= {f"scene_grounding_{prefix}{k}": v for k, v in metrics.items() if not (prefix and "random" in k)}
        return out


def scene_table(results: dict[str, float], grouping: str, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A Markdown table of metrics (rows) by the groups of one grouping (columns, "all" first),
    from `evaluate_scenes`' result; empty when the result has no such groups."""
    prefix = f"by_{grouping}/"
    names = list(dict.fromkeys(key[len(prefix) :].split("/")[0] for key in results if key.startswith(prefix)))
    if not names:
        return ""
    cell = lambda key: f"{results[key]:.3f}" if key in results else "-"  # noqa: E731
    lines = [f"| {grouping} | all | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    lines.append("| scenes | " + " | ".join([str(results["num_scenes"])] + [str(results[f"{prefix}{n}/num_scenes"]) for n in names]) + " |")
    for metric in metrics:
        if metric in results or any(f"{prefix}{n}/{metric}" in results for n in names):
            lines.append(f"| {metric} | {cell(metric)} | " + " | ".join(cell(f"{prefix}{n}/{metric}") for n in names) + " |")
    return "\n".join(lines)
