"""Scene backdrops (procedural, or blurred crops of catalog photos) and whole-scene camera
artefacts (sensor noise, blur, JPEG)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from ..transforms import open_image

# the first five are the original kinds, in their original order: a seed draws the same scenes
CLASSIC_BACKGROUNDS = ("solid", "gradient", "blotches", "stripes", "tiles")
TEXTURE_BACKGROUNDS = ("noise", "fabric", "wood")
PHOTO_BACKGROUNDS = ("photo", "mosaic")  # need catalog photos
BACKGROUNDS = CLASSIC_BACKGROUNDS + TEXTURE_BACKGROUNDS + PHOTO_BACKGROUNDS

# a catalog photo (H, W, 3) uint8 drawn with the scene's generator
PhotoSource = Callable[[np.random.Generator], np.ndarray]


def _colour(rng: np.random.Generator, low: int = 40, high: int = 235) -> np.ndarray:
    return rng.integers(low, high, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: a cells x cells random grid upsampled smoothly."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255


def _blurred_crop(photo: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """A random crop of the photo's central part (where the product is), shrunk to a few pixels
    and blown up to side x side: the colours and layout of a real photo, none of its detail."""
    h, w = photo.shape[:2]
    frac = rng.uniform(0.3, 0.7)
    ch, cw = max(2, int(h * frac)), max(2, int(w * frac))
    y = int(rng.integers(int(h * 0.15), max(int(h * 0.15) + 1, int(h * 0.85) - ch + 1)))
    x = int(rng.integers(int(w * 0.15), max(int(w * 0.15) + 1, int(w * 0.85) - cw + 1)))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw])
    tiny = max(2, int(rng.integers(4, 17)))
    return np.asarray(crop.resize((tiny, tiny), Image.BILINEAR).resize((side, side), Image.BICUBIC), dtype=np.float32)


def background(rng: np.random.Generator, size: int, kinds: tuple[str, ...] = CLASSIC_BACKGROUNDS, photos: PhotoSource | None = None) -> np.ndarray:
    """A backdrop (size, size, 3) uint8 of one of `kinds`, plus fine sensor-like noise. Never
    plain white, so the scene is not the catalog photo."""
    kind = kinds[int(rng.integers(len(kinds)))]
    a, b = _colour(rng), _colour(rng)
    if kind in ("gradient", "stripes", "wood"):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "solid":
        out = np.broadcast_to(a, (size, size, 3)).copy()
    elif kind == "gradient":  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        out = a + (b - a) * t[..., None]
    elif kind == "blotches":  # coarse colour noise, upsampled smoothly
        cells = int(rng.integers(3, 9))
        coarse = np.clip(a + rng.normal(0, 35, (cells, cells, 3)), 0, 255).astype(np.uint8)
        out = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    elif kind == "stripes":  # horizontal, vertical or diagonal
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        period = rng.uniform(0.04, 0.2)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        out = np.where((np.floor(t) % 2 == 0)[..., None], a, b)
    elif kind == "tiles":  # per-tile shade around one colour, darker grout lines
        tile = int(rng.integers(max(3, size // 10), max(4, size // 3)))
        n = size // tile + 1
        shades = a + rng.normal(0, 15, (n, n, 1))
        iy, ix = (np.arange(size) // tile), (np.arange(size) // tile)
        out = shades[iy[:, None], ix[None, :]]
        grout = (np.arange(size) % tile < 2)
        out[grout, :] *= 0.6
        out[:, grout] *= 0.6
    elif kind == "noise":  # fractal value noise: octaves of finer and fainter random grids
        t = np.zeros((size, size), np.float32)
        cells, weight = int(rng.integers(2, 5)), 1.0
        while cells < size:
            t += weight * _smooth_noise(rng, size, cells)
            cells, weight = cells * 2, weight * 0.55
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        out = a + (b - a) * t[..., None]
    elif kind == "fabric":  # plain weave: warp and weft threads alternate on top
        period = int(rng.integers(3, max(4, size // 24)))
        index = np.arange(size) // period
        phase = (np.arange(size) % period + 0.5) / period
        thread = np.sin(math.pi * phase)  # bright in a thread's middle, dark at its edges
        warp_on_top = (index[:, None] + index[None, :]) % 2 == 0
        shade = np.where(warp_on_top, thread[None, :], thread[:, None])
        jitter = rng.normal(0, 0.08, size // period + 1)  # thread-to-thread dye variation
        shade = shade * (0.75 + np.where(warp_on_top, jitter[index][None, :], jitter[index][:, None]))
        out = a * (0.55 + 0.45 * shade[..., None])
    elif kind == "wood":  # grain: bands along one axis, bent by low-frequency noise
        angle = rng.uniform(0, math.pi)
        along = xx * math.cos(angle) + yy * math.sin(angle)
        bend = _smooth_noise(rng, size, int(rng.integers(2, 5)))
        t = (along * rng.uniform(6, 18) + bend * rng.uniform(1, 4)) % 1.0
        dark = a * 0.55
        out = a + (dark - a) * (t**3)[..., None] + rng.normal(0, 6, (size, 1, 1)).astype(np.float32)
    elif kind in ("photo", "mosaic"):
        if photos is None:
            raise ValueError(f"background {kind!r} needs catalog photos, and none were given")
        if kind == "photo":
            out = _blurred_crop(photos(rng), rng, size)
        else:  # a grid of blurred crops of several photos: a shop shelf, out of focus
            n = int(rng.integers(2, 5))
            edges = np.linspace(0, size, n + 1).round().astype(int)
            out = np.empty((size, size, 3), np.float32)
            for i in range(n):
                for j in range(n):
                    h, w = edges[i + 1] - edges[i], edges[j + 1] - edges[j]
                    tile = _blurred_crop(photos(rng), rng, max(h, w))[:h, :w]
                    out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = tile
            blur = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 60))
            out = np.asarray(blur, dtype=np.float32)
        out = 0.8 * out + 0.2 * a  # a tint: a crop of a white studio backdrop is not plain white
    else:
        raise ValueError(f"unknown background kind {kind!r}; known: {', '.join(BACKGROUNDS)}")
    out = out + rng.normal(0, 4, (size, size, 1))
    return np.clip(out, 0, 255).astype(np.uint8)


def camera(scene: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The whole scene as a phone camera and a listing site leave it: per-pixel sensor noise,
    sometimes a little blur, sometimes a low-quality JPEG round trip (each step drawn)."""
    pixels = np.asarray(scene, dtype=np.float32)
    if rng.random() < 0.5:
        out = Image.fromarray(np.asarray(scene)).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.5)))
        pixels = np.asarray(out, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(2, 10), pixels.shape)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=int(rng.integers(15, 55)))
        with open_image(io.BytesIO(buffer.getvalue())) as decoded:
            out = decoded.convert("RGB")
    return out
