"""From a heat map over the token grid to a box: upsample, rescale to [0, 1], keep the pixels
above a threshold (relative to the map's mean or maximum, or the highest holding a share of its
sum), box the largest connected region, the one holding the peak, or all of them
(`eclip.config.BoxRule`; each model's rule is `ModelConfig.box_rule()`)."""

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

    Pixels >= threshold x the map's maximum (relative_to="max") or its mean ("mean"), or the
    highest pixels holding `threshold` of the map's sum ("mass") are kept; the box encloses the
    largest connected region of them (region="largest"), the region that holds the map's
    maximum ("peak"), or all of them ("union"). The defaults are the half-maximum rule; models
    use `ModelConfig.box_rule()`.
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
    else:
        raise ValueError(f"unknown box threshold reference {relative_to!r} (max, mean or mass)")
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


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def peak_point(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the map's maximum, as fractions, at the pixel centre."""
    h, w = heatmap.shape
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (float((x + 0.5) / w), float((y + 0.5) / h))


def box_by_rule(heatmap: np.ndarray, rule: BoxRule) -> tuple[float, float, float, float]:
    """`box_from_heatmap` with a model's rule (`ModelConfig.box_rule()`)."""
    return box_from_heatmap(heatmap, rule.threshold, rule.relative_to, rule.region)
