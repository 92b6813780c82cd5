"""Image loading and preprocessing. Images are squashed to a square so that a box given as
fractions of the width and height keeps its meaning."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

MEAN = 0.5
STD = 0.5

# A listing photo larger than this (width x height) is refused rather than decoded: a
# decompression bomb is a few hundred KB on disk and gigabytes decoded.
MAX_IMAGE_PIXELS = 64_000_000
# Pillow's own check, a backstop for code that opens images without `open_image`: it only warns
# up to twice its limit, so `open_image` checks the size itself.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageTooLarge(Image.DecompressionBombError):
    """An image whose width x height is over the pixel limit, refused before it is decoded."""


@contextmanager
def open_image(source: str | Path | IO[bytes], max_pixels: int = MAX_IMAGE_PIXELS, formats: tuple[str, ...] | None = None) -> Iterator[Image.Image]:
    """`Image.open` (which reads the header only), refused with ImageTooLarge when the header
    says more than `max_pixels` pixels, before anything is decoded. Every image eclip reads
    from a file or bytes is opened here."""
    try:
        with warnings.catch_warnings():  # Pillow warns between its limit and twice it; refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=formats)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as error:  # over twice Pillow's limit: refused by Pillow
        raise ImageTooLarge(str(error)) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {max_pixels:,} pixels (decompression bomb?)")
        yield image


def load_rgb(path: str) -> Image.Image:
    with open_image(path) as image:
        return image.convert("RGB")


def to_uint8_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) uint8."""
    image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float, the model's input."""
    return (images.float() / 255.0 - MEAN) / STD


def as_pil(image: object) -> Image.Image:
    """A photo as an RGB PIL image: a PIL image, a path, or a numpy array (H, W) / (H, W, 3|4) of
    uint8, or of floats in [0, 1]. TypeError naming what was given for anything else."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(os.fspath(image))
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), not {image.shape}")
        if np.issubdtype(image.dtype, np.floating):
            image = (np.clip(image, 0.0, 1.0) * 255.0).round()
        elif image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 or floats in [0, 1], not {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    raise TypeError(f"an image must be a PIL image, a file path or a numpy array, not {type(image).__name__}")


def preprocess(image: object, size: int) -> torch.Tensor:
    """The evaluation transform: a photo (`as_pil`) or a (3, H, W) uint8 tensor -> the model's
    input, (3, size, size) float, squashed to the square and normalised."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"an image tensor must be (3, H, W) uint8, not {tuple(image.shape)} {image.dtype} "
                "(a float (B, 3, S, S) batch is taken as already preprocessed)"
            )
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    return normalize(to_uint8_tensor(as_pil(image), size))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    return (images * STD + MEAN).clamp(0, 1)


def augment_view(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A second view of a product that has only one image: random resized crop (60-100 % of
    the area, aspect 3/4-4/3), horizontal flip and a brightness jitter. uint8 in, uint8 out."""
    _, h, w = image.shape
    r = torch.rand(5, generator=generator).tolist()
    area = 0.6 + 0.4 * r[0]
    aspect = (3 / 4) * (16 / 9) ** r[1]
    ch = min(h, max(1, round((area * h * w / aspect) ** 0.5)))
    cw = min(w, max(1, round((area * h * w * aspect) ** 0.5)))
    y0 = int(r[2] * (h - ch + 1))
    x0 = int(r[3] * (w - cw + 1))
    crop = image[:, y0 : y0 + ch, x0 : x0 + cw].float().unsqueeze(0)
    view = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    if r[4] < 0.5:
        view = view.flip(-1)
    brightness = 0.8 + 0.4 * torch.rand(1, generator=generator).item()
    return (view * brightness).clamp(0, 255).round().to(torch.uint8)
