"""Zero-shot evaluation on held-out products (docs/design.md, "Downstream tasks and metrics").

One pass over the held-out images computes everything: category classification from
prompt-ensembled label texts, text-to-product retrieval from the titles, same-product retrieval
across listing images, grounding of each image's own title against its true box, and a linear
probe of the category on the frozen product embeddings.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.catalog import Product
from .data.dataset import ImageStore
from .data.transforms import normalize
from .model.eclip import ECLIP, ImageEncoding
from .model.grounding import box_iou, peak_point, upsample_heatmap

PROMPTS = ["a photo of a {}", "{}", "a {} for sale", "product listing of a {}", "a {} in a listing photo"]

# The keys every consumer (demo, eval --json, later benchmarks) relies on.
HEADLINE_METRICS = [
    "classification_top1",
    "text_to_product_r10",
    "same_product_map_r",
    "grounding_acc50",
]


@torch.no_grad()
def encode_labels(model: ECLIP, labels: list[str], prompts: list[str] = PROMPTS) -> torch.Tensor:
    """(C, D): each label's prompts embedded, averaged, renormalised."""
    embeddings = []
    for label in labels:
        texts = model.encode_text([p.format(label) for p in prompts])
        embeddings.append(F.normalize(texts.mean(dim=0), dim=-1))
    return torch.stack(embeddings)


def ranks_metrics(scores: np.ndarray, relevant: np.ndarray, ks=(1, 10)) -> dict[str, float]:
    """Retrieval metrics for query rows over gallery columns. relevant (Q, G) bool."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)  # (Q, G) in rank order
    out = {f"r{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
    n_rel = relevant.sum(axis=1)
    cum = np.cumsum(hits, axis=1)
    precision = cum / np.arange(1, hits.shape[1] + 1)
    top = min(10, hits.shape[1])
    out["map10"] = float(((precision[:, :top] * hits[:, :top]).sum(axis=1) / np.minimum(n_rel, 10)).mean())
    # mAP@R: R = number of relevant items of that query
    map_r = [(precision[q, : n_rel[q]] * hits[q, : n_rel[q]]).sum() / n_rel[q] for q in range(len(n_rel))]
    out["map_r"] = float(np.mean(map_r))
    return out


def macro_f1(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (truth == c))
        fp = np.sum((predicted == c) & (truth != c))
        fn = np.sum((predicted != c) & (truth == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def random_box_baseline(boxes: list[tuple], seed: int = 0, trials: int = 20) -> tuple[float, float]:
    """Acc@IoU0.5 and mean IoU of boxes drawn at random (uniform corners): the floor that
    grounding must beat."""
    rng = random.Random(seed)
    ious = []
    for _ in range(trials):
        for box in boxes:
            xs = sorted(rng.random() for _ in range(2))
            ys = sorted(rng.random() for _ in range(2))
            ious.append(box_iou((xs[0], ys[0], xs[1], ys[1]), box))
    if not ious:
        return 0.0, 0.0
    return float(np.mean(np.array(ious) >= 0.5)), float(np.mean(ious))


def point_in_box(point: tuple[float, float], box: tuple[float, ...]) -> bool:
    """The pointing game's hit: (x, y) inside (x0, y0, x1, y1), edges included."""
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def grounding_metrics(ious: list[float], points: list[bool], boxes: list[tuple], prefix: str) -> dict[str, float]:
    """Acc@IoU0.5, mean IoU and pointing game, each with its random floor, as `{prefix}acc50`..."""
    if not ious:
        return {}
    acc_random, iou_random = random_box_baseline(boxes)
    return {
        f"{prefix}acc50": float(np.mean(np.array(ious) >= 0.5)),
        f"{prefix}mean_iou": float(np.mean(ious)),
        f"{prefix}pointing": float(np.mean(points)),
        f"{prefix}acc50_random_box": acc_random,
        f"{prefix}mean_iou_random_box": iou_random,
        # a point drawn uniformly lands in the box with probability = its area
        f"{prefix}pointing_random": float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])),
    }


def encoded_batches(
    model: ECLIP, store: ImageStore, slots: list[tuple[int, int]], batch_size: int, desc: str, progress: bool
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor, ImageEncoding]]:
    """(slots, normalised images, encoding) per batch: each image through the image tower once,
    every metric read from the same encoding. The images stay on the CPU; the model moves them
    to its device, and the encoding is there."""
    for start in tqdm(range(0, len(slots), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = slots[start : start + batch_size]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        yield chunk, images, model.encode_image(images)


def ground_encoded(
    model: ECLIP,
    encoding: ImageEncoding,
    image_size: tuple[int, int],
    texts: torch.Tensor,  # (B, D): text i for image i
    boxes: list[tuple | None],  # the true box of image i, or None (not scored)
    grounding_map: str | None = None,
) -> tuple[list[float], list[bool]]:
    """IoU of the model's box and the pointing-game hit of each image that has a true box, from
    an encoding already made (what `model.ground` computes, without encoding again)."""
    if all(box is None for box in boxes):
        return [], []
    maps, _ = model.heatmaps_from(encoding, texts, grounding_map=grounding_map)
    heatmaps = upsample_heatmap(maps, image_size).float().cpu().numpy()
    ious, points = [], []
    for heatmap, box in zip(heatmaps, boxes):
        if box is None:
            continue
        ious.append(box_iou(model.box_from_heatmap(heatmap, grounding_map), box))  # the map's own box rule
        points.append(point_in_box(peak_point(heatmap), box))
    return ious, points


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full batch L-BFGS with an L2 penalty: (D, C), (C,).
    Runs with autograd also when called under `torch.no_grad` or `torch.inference_mode`."""
    # inference tensors cannot be saved for backward: the fit works on copies made outside it
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()
        weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    features: torch.Tensor,  # (N, D) frozen embeddings
    labels: np.ndarray,  # (N,) class index
    groups: np.ndarray,  # (N,) product index: a product's images never straddle the two halves
    seed: int = 0,
) -> float:
    """The linear probe (docs/design.md): accuracy of a logistic regression on frozen features, 2-fold by
    product (fit on one half of the products, test on the other, then swapped; the two
    accuracies averaged). Unlike zero-shot classification it needs no text: it says whether the
    image embedding holds the label at all."""
    classes, labels = np.unique(labels, return_inverse=True)
    product_ids = np.unique(groups)
    first_half = np.random.default_rng(seed).permutation(product_ids)[: len(product_ids) // 2]
    in_first = np.isin(groups, first_half)
    x, y = features.double(), torch.from_numpy(labels)
    accuracies = []
    for fit_on in (in_first, ~in_first):
        fit, test = torch.from_numpy(fit_on), torch.from_numpy(~fit_on)
        if not fit.any() or not test.any():
            continue
        mean, std = x[fit].mean(dim=0), x[fit].std(dim=0).clamp_min(1e-6)  # standardised on the fit half
        z = (x - mean) / std
        weight, bias = fit_logistic_regression(z[fit], y[fit], len(classes))
        predicted = (z[test] @ weight + bias).argmax(dim=1)
        accuracies.append(float((predicted == y[test]).double().mean()))
    return float(np.mean(accuracies)) if accuracies else float("nan")


def _label_attributes(products: list[Product], max_values: int = 50) -> dict[str, list[str]]:
    """Attributes whose values are short strings from a small set: zero-shot label sets."""
    values: dict[str, set[str]] = {}
    for product in products:
        for name, value in product.attributes.items():
            if isinstance(value, str) and 0 < len(value) <= 40:
                values.setdefault(name, set()).add(value)
    return {name: sorted(v) for name, v in values.items() if 2 <= len(v) <= max_values}


@torch.no_grad()
def evaluate(
    model: ECLIP,
    products: list[Product],
    batch_size: int = 128,
    store: ImageStore | None = None,
    progress: bool = True,
    prompts: list[str] = PROMPTS,
    readout: str | None = None,
    grounding_map: str | None = None,
) -> dict[str, float]:
    """All the metrics of the module doc, each image encoded once. readout and grounding_map,
    when given, are passed to the model's methods (else its config decides)."""
    model.eval()
    store = store or ImageStore(products, model.image_size)
    slots = [(p, i) for p, product in enumerate(products) for i in range(len(product.images))]
    image_pid = np.array([p for p, _ in slots])

    titles = model.encode_text([p.title for p in products])  # (P, D)
    categories = sorted({p.category for p in products if p.category is not None})
    labels = encode_labels(model, categories, prompts) if categories else None
    # attributes with a small vocabulary (colour, pattern, ...) are classified zero-shot too
    attribute_names = _label_attributes(products)
    attribute_labels = {name: encode_labels(model, values, prompts) for name, values in attribute_names.items()}
    attribute_scores: dict[str, list[torch.Tensor]] = {name: [] for name in attribute_names}

    product_embeddings, title_scores, label_scores = [], [], []
    ious, points = [], []
    for chunk, images, encoding in encoded_batches(model, store, slots, batch_size, "evaluating", progress):
        # results come back to the CPU batch by batch (the metrics are numpy)
        product_embeddings.append(model.product_embedding_from(encoding, readout).float().cpu())
        title_scores.append(model.image_text_scores(encoding, titles, readout).float().cpu())
        if labels is not None:
            label_scores.append(model.image_text_scores(encoding, labels, readout).float().cpu())
        for name, embeddings in attribute_labels.items():
            attribute_scores[name].append(model.image_text_scores(encoding, embeddings, readout).float().cpu())
        own = titles[torch.tensor([p for p, _ in chunk])]
        boxes = [products[p].images[i].box for p, i in chunk]
        chunk_ious, chunk_points = ground_encoded(model, encoding, tuple(images.shape[-2:]), own, boxes, grounding_map)
        ious += chunk_ious
        points += chunk_points

    results: dict[str, float] = {"num_products": len(products), "num_images": len(slots)}

    # text-to-product: each title against every image; a hit is any image of its product
    scores = torch.cat(title_scores).T.float().cpu().numpy()  # (P, I)
    relevant = np.arange(len(products))[:, None] == image_pid[None, :]
    t2p = ranks_metrics(scores, relevant)
    results |= {"text_to_product_r1": t2p["r1"], "text_to_product_r10": t2p["r10"], "text_to_product_map10": t2p["map10"]}

    # same-product: each image against all other images
    emb = torch.cat(product_embeddings).float().cpu().numpy()
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    same = image_pid[:, None] == image_pid[None, :]
    np.fill_diagonal(same, False)
    queries = same.any(axis=1)
    if queries.any():
        sp = ranks_metrics(sims[queries], same[queries])
        results |= {"same_product_map_r": sp["map_r"], "same_product_r1": sp["r1"]}

    if labels is not None:
        truth_names = [products[p].category for p in image_pid]
        keep = np.array([c is not None for c in truth_names])
        truth = np.array([categories.index(c) if c is not None else -1 for c in truth_names])
        logits = torch.cat(label_scores).float().cpu().numpy()
        predicted = logits.argmax(axis=1)
        top5 = np.argsort(-logits, axis=1)[:, :5]
        results["classification_top1"] = float((predicted == truth)[keep].mean())
        results["classification_top5"] = float((top5 == truth[:, None]).any(axis=1)[keep].mean())
        results["classification_macro_f1"] = macro_f1(predicted[keep], truth[keep], len(categories))
        if len(set(truth[keep].tolist())) >= 2:
            results["linear_probe_category_top1"] = linear_probe(
                torch.from_numpy(emb[keep]), truth[keep], image_pid[keep]
            )

    for name, values in attribute_names.items():
        truth = np.array([values.index(str(products[p].attributes[name])) if name in products[p].attributes else -1 for p in image_pid])
        predicted = torch.cat(attribute_scores[name]).float().cpu().numpy().argmax(axis=1)
        known = truth >= 0
        results[f"attribute_{name}_top1"] = float((predicted == truth)[known].mean())
        results[f"attribute_{name}_macro_f1"] = macro_f1(predicted[known], truth[known], len(values))

    boxes = [products[p].images[i].box for p, i in slots if products[p].images[i].box is not None]
    results |= grounding_metrics(ious, points, boxes, "grounding_")
    return results
