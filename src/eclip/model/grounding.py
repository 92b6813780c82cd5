"""From a heat map over the token grid to a box: upsample, rescale to [0, 1], keep the pixels
above a threshold (relative to the map's mean, its maximum or its Otsu level, or the highest
holding a share of its sum), box the largest connected region, the one holding the peak, or
all of them (`eclip.config.BoxRule`; each model's rule is `ModelConfig.box_rule()`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..config import BoxRule


def upsample_heatmap(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear, rescaled to [0, 1] per map."""
    up = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
    up = up.squeeze(1)
    low = up.flatten(1).min(dim=1).values[:, None, None]
    high = up.flatten(1).max(dim=1).values[:, None, None]
    return (up - low) / (high - low).clamp_min(1e-12)


def box_from_heatmap(
    heatmap: np.ndarray,
    threshold: float = 0.5,
    relative_to: str = "max",
    region: str = "largest",
) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) as fractions of the width and height, from one map in [0, 1].

    Pixels >= threshold x the map's maximum (relative_to="max"), its mean ("mean") or its Otsu
    level ("otsu": the level splitting the values into two classes of the least variance within
    each), or the highest pixels holding `threshold` of the map's sum ("mass") are kept; the
    box encloses the largest connected region of them (region="largest"), the region that
    holds the map's maximum ("peak"), or all of them ("union"). The defaults are the
    half-maximum rule; models use `ModelConfig.box_rule()`.
    x1 and y1 are exclusive, so a one-pixel region has a non-zero area.
    """
    h, w = heatmap.shape
    if relative_to == "max":
        level = threshold * heatmap.max()
    elif relative_to == "mean":
        # never above the peak: a map that is flat but for one pixel still keeps that pixel
        level = min(threshold * heatmap.mean(), heatmap.max())
    elif relative_to == "mass":
        # the highest-density region: the fewest pixels that hold `threshold` of the map's sum,
        # so a peaked map keeps a small region and a spread one a large region
        values = np.sort(heatmap, axis=None)[::-1]
        cumulative = np.cumsum(values)
        if cumulative[-1] <= 0:
            return (0.0, 0.0, 1.0, 1.0)
        level = values[min(int(np.searchsorted(cumulative, threshold * cumulative[-1])), values.size - 1)]
    elif relative_to == "otsu":
        level = min(threshold * otsu_level(heatmap), heatmap.max())
    else:
        raise ValueError(f"unknown box threshold reference {relative_to!r} (max, mean, otsu or mass)")
    mask = heatmap >= level
    labels, count = ndimage.label(mask)
    if count == 0:  # flat map: the whole image
        return (0.0, 0.0, 1.0, 1.0)
    if region == "union":
        ys, xs = np.nonzero(mask)
    elif region == "largest":
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    elif region == "peak":  # the maximum is always kept (level <= max), so its label is > 0
        ys, xs = np.nonzero(labels == labels[np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)])
    else:
        raise ValueError(f"unknown box region {region!r} (largest, peak or union)")
    return (float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h))


def otsu_level(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the level that maximises the variance between the values below and at
    or above it (equivalently, minimises the variance within each), so `values >= level` keeps
    the upper class; a constant map gives its value."""
    flat = values.ravel().astype(np.float64)
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        return high
    counts, edges = np.histogram(flat, bins=bins, range=(low, high))
    weight = np.cumsum(counts)[:-1] / flat.size  # share of values below each inner edge
    centres = (edges[:-1] + edges[1:]) / 2
    below_sum = np.cumsum(counts * centres)[:-1]
    total_mean = float((counts * centres).sum()) / flat.size
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = below_sum / (weight * flat.size)
        mean_above = (total_mean - weight * mean_below) / (1 - weight)
        between = weight * (1 - weight) * (mean_below - mean_above) ** 2
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0, neginf=-1.0)
    # empty bins between the classes tie: the middle of the gap, not its lower end
    ties = np.flatnonzero(between == between.max())
    return float(edges[1:-1][ties[len(ties) // 2]])


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def peak_point(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the map's maximum, as fractions: the centre of the connected pixels that hold
    it (to rounding), so a plateau (a bilinear upsample spreads a border token's value over a
    block) gives its middle, not whichever of its pixels rounding makes largest."""
    h, w = heatmap.shape
    top = float(heatmap.max())
    labels, _ = ndimage.label(heatmap >= top - 1e-6 * max(abs(top), 1.0))
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    ys, xs = np.nonzero(labels == labels[y, x])
    return (float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h))


def box_by_rule(heatmap: np.ndarray, rule: BoxRule) -> tuple[float, float, float, float]:
    """`box_from_heatmap` with a model's rule (`ModelConfig.box_rule()`)."""
    return box_from_heatmap(heatmap, rule.threshold, rule.relative_to, rule.region)
