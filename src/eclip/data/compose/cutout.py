"""Cutting a product out of its studio photo's plain light background, and a cache of cut-outs."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..transforms import open_image

logger = logging.getLogger("eclip.data")


def cut_out_mask(rgb: np.ndarray, tolerance: int = 10, keep_fraction: float = 0.15, edge_threshold: float = 12.0) -> np.ndarray:
    """Foreground mask (H, W) bool of a product photographed on a plain light background.

    The background colour is the median of the photo's border (studio shots are white or light
    grey); a pixel further than `tolerance` from it in any channel is foreground. The tolerance
    is low because white clothes on white differ from it by only a few levels. An opening removes
    JPEG speckle, the largest component is kept together with components at least
    `keep_fraction` of its size (the second shoe of a pair), a closing seals small gaps in the
    outline, and every hole is filled: the white body of a white t-shirt enclosed by its trims
    and the white gap inside a bag's handle look the same to a threshold, and a bag with a white
    gap is a smaller error than a t-shirt without its body.
    """
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.int16)
    paper = np.median(border, axis=0)  # the studio backdrop colour
    distance = np.abs(rgb.astype(np.int16) - paper).max(axis=2)
    foreground = ndimage.binary_opening(distance > tolerance, structure=np.ones((3, 3), bool))
    # faint outlines (a white shirt on white is a few levels of shading at its edge) join the
    # foreground, so that the closing and hole filling below can recover the white inside
    grey = rgb.astype(np.float32).mean(axis=2)
    edges = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1)) > edge_threshold
    foreground |= edges
    labels, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = ndimage.sum(foreground, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
    mask = np.isin(labels, keep)
    # closing without the border effect: pad so the structure never reads outside the image
    pad = 3
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=np.ones((5, 5), bool))[pad:-pad, pad:-pad]
    filled = ndimage.binary_fill_holes(closed | mask)
    # the edges and the closing grew the outline by a pixel or two of background: shave the
    # rim's background-coloured pixels off again, or every pasted product wears a white halo
    rim = filled & ~ndimage.binary_erosion(filled, iterations=3, border_value=1)
    filled &= ~(rim & (distance <= tolerance))
    return filled


def cut_out(image: Image.Image, max_side: int | None = None) -> tuple[Image.Image, bool]:
    """RGBA crop of the product (alpha = mask) and whether the mask was usable. A photo whose
    mask is (nearly) empty is returned whole and opaque: the product is then at least present."""
    image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BILINEAR)  # nothing is pasted larger than this
    rgb = np.asarray(image)
    mask = cut_out_mask(rgb)
    ok = mask.sum() >= 0.01 * mask.size
    if not ok:
        mask = np.ones(mask.shape, bool)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgba = np.dstack([rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255])
    return Image.fromarray(rgba, "RGBA"), bool(ok)


def skin_fraction(cut: Image.Image) -> float:
    """Share of a cut-out's opaque pixels in a common skin-tone range (YCbCr): apparel photos
    that show the model wearing the product score high, a shoe or a bag on its own low."""
    ycbcr = np.asarray(cut.convert("RGB").convert("YCbCr"))
    alpha = np.asarray(cut.getchannel("A")) > 127
    cb, cr = ycbcr[..., 1], ycbcr[..., 2]
    skin = (cb >= 77) & (cb <= 127) & (cr >= 137) & (cr <= 173) & (ycbcr[..., 0] > 60)
    return float((skin & alpha).sum() / max(1, alpha.sum()))


class CutOutCache:
    """Cut-outs by image path, least recently used dropped first once they hold more than
    `max_bytes` (or `capacity` items). A product is a distractor in many scenes, in every worker
    process: with `disk` (a folder) each photo is cut out once and saved as PNG, and any worker
    or rank that shares the folder reads it back (a few times faster than cutting it again)."""

    def __init__(self, max_side: int, capacity: int | None = None, max_bytes: int | None = 512 << 20, disk: str | Path | None = None):
        self.max_side = max_side
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.disk = None if disk is None else Path(disk)
        if self.disk is not None:
            self.disk.mkdir(parents=True, exist_ok=True)
        self.bytes = 0
        self.items: OrderedDict[str, Image.Image] = OrderedDict()
        self.empty: set[str] = set()
        self.skin: dict[str, float] = {}
        self.cuts = 0  # photos cut out here (not found in memory or on disk)

    def _load(self, path: str) -> tuple[Image.Image, bool]:
        if self.disk is None:
            with open_image(path) as image:
                self.cuts += 1
                return cut_out(image, self.max_side)
        key = hashlib.sha1(f"{self.max_side}:{path}".encode()).hexdigest()
        for ok, name in [(True, f"{key}.png"), (False, f"{key}.whole.png")]:  # .whole: no mask found
            try:
                with open_image(self.disk / name) as saved:
                    saved.load()
                    return saved, ok
            except FileNotFoundError:
                continue
        with open_image(path) as image:
            cut, ok = cut_out(image, self.max_side)
        self.cuts += 1
        target = self.disk / (f"{key}.png" if ok else f"{key}.whole.png")
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # another worker may write it too
        cut.save(tmp, format="PNG", compress_level=1)
        tmp.replace(target)
        return cut, ok

    def get(self, path: str) -> Image.Image:
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        cut, ok = self._load(path)
        if not ok and path not in self.empty:
            self.empty.add(path)
            logger.warning("no product found on the background of %s; it is pasted whole", path)
        self.items[path] = cut
        self.bytes += cut.width * cut.height * 4
        while len(self.items) > 1 and (
            (self.capacity is not None and len(self.items) > self.capacity)
            or (self.max_bytes is not None and self.bytes > self.max_bytes)
        ):
            _, old = self.items.popitem(last=False)
            self.bytes -= old.width * old.height * 4
        return cut

    def skin_fraction(self, path: str) -> float:
        if path not in self.skin:
            self.skin[path] = skin_fraction(self.get(path))
        return self.skin[path]
