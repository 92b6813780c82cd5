"""Tiles: the whole photo plus overlapping crops of it, each resized to the model's input.

A product a tenth of the photo covers a handful of the image tower's tokens; in a crop a
quarter of the photo it covers four times as many. A tiled query encodes each tile as an image
of its own (slicing, as SAHI does for small-object detection); a catalog product scores its
best match over the tiles, and grounding zooms into the tile that holds what the whole image
found. Boxes are (x0, y0, x1, y1) fractions of the image; tile 0 is
always the whole image, so a tiled reading can fall back to the untiled one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .data.transforms import to_uint8_tensor
from .model.grounding import upsample_heatmap
from .model.inference import Grounding, ImageEncoding, Inference
from .retrieval import mix_query

Box = tuple[float, float, float, float]


def tile_grids(grid: int | Sequence[int]) -> tuple[int, ...]:
    """The crop grids of a tiling: one grid, or several (a pyramid, read coarse to fine);
    grids 0 and 1 add no crops."""
    grids = (grid,) if isinstance(grid, int) else tuple(grid)
    if any(not isinstance(g, int) or g < 0 for g in grids):
        raise ValueError(f"tiles need grids of whole numbers >= 0, got {grid!r}")
    return tuple(g for g in grids if g >= 2)


def tile_boxes(grid: int | Sequence[int], overlap: float = 0.25) -> list[Box]:
    """The whole image, then for each grid `grid` x `grid` square crops overlapping by
    `overlap` of a crop's side, row by row (several grids: coarse first, as given). grid 0 or
    1: the whole image alone."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tiles need 0 <= overlap < 1, got overlap={overlap}")
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for g in tile_grids(grid):
        side = 1.0 / (g - (g - 1) * overlap)
        step = side * (1.0 - overlap)
        for row in range(g):
            for col in range(g):
                x0, y0 = col * step, row * step
                boxes.append((x0, y0, min(1.0, x0 + side), min(1.0, y0 + side)))
    return boxes


def crop_tiles(images: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """(B, C, H, W) float images -> (B * T, C, H, W): each image's tiles in `boxes` order,
    resized back to the image's size (bilinear). Works on normalised images as they are."""
    b, _, h, w = images.shape
    out = []
    for x0, y0, x1, y1 in boxes:
        part = images[:, :, round(y0 * h) : max(round(y1 * h), round(y0 * h) + 1), round(x0 * w) : max(round(x1 * w), round(x0 * w) + 1)]
        out.append(part if part.shape[-2:] == (h, w) else F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False))
    return torch.stack(out, dim=1).flatten(0, 1)  # (B, T, C, H, W) -> (B * T, ...)


def pil_tiles(image: Image.Image, boxes: list[Box], size: int) -> torch.Tensor:
    """(T, 3, size, size) uint8: the tiles cut from the photo at its full resolution, then
    resized, so a large photo's small product keeps its pixels."""
    w, h = image.size
    return torch.stack([
        to_uint8_tensor(image.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))), size) for x0, y0, x1, y1 in boxes
    ])


def box_in_image(box: Box, tile: Box) -> Box:
    """A box in a tile's fractions -> the same box in the whole image's fractions."""
    w, h = tile[2] - tile[0], tile[3] - tile[1]
    return (tile[0] + box[0] * w, tile[1] + box[1] * h, tile[0] + box[2] * w, tile[1] + box[3] * h)


def tile_count(encoding_rows: int, images: int) -> int:
    """Tiles per image of an encoding of `images` tiled images."""
    if images <= 0 or encoding_rows % images:
        raise ValueError(f"an encoding of {encoding_rows} rows is not a whole number of tiles for {images} images")
    return encoding_rows // images


def tiled_product_vectors(model: Inference, encoding: ImageEncoding, images: int, readout: str | None = None) -> torch.Tensor:
    """(B, T, D): each tile's product embedding (`product_embedding_from`), the query vectors
    of a tiled text-free search; a catalog product scores its best match among them."""
    vectors = model.product_embedding_from(encoding, readout)
    return vectors.view(images, tile_count(len(vectors), images), -1)


def tiled_hinted_vectors(
    model: Inference, encoding: ImageEncoding, texts: torch.Tensor, text_weight: float = 0.5, readout: str | None = None
) -> torch.Tensor:
    """(B, T, D) the image-plus-text query of each tile: in tile t of image i, the instance text
    i selects (`text_guided_embedding`; the global embedding for the baseline or readout
    "global"), mixed with the text as `image_text_query` mixes. A catalog product scores its
    best match over the tiles. texts (B, D); the encoding holds the B images' tiles, tile-major."""
    images = len(texts)
    tiles = tile_count(len(encoding.global_embedding), images)
    repeated = texts.repeat_interleave(tiles, dim=0)  # (B * T, D): text i for each tile of image i
    side = model.text_guided_embedding(encoding, repeated, readout)
    return mix_query(side, repeated, text_weight).view(images, tiles, -1)


def best_match_scores(vectors: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, V, D) query vectors and (G, D) gallery -> (Q, G): each gallery item's best match."""
    return torch.einsum("qvd,gd->qvg", vectors, gallery).amax(dim=1)


def containing_tile(box: Box, boxes: list[Box]) -> int:
    """The tile (index >= 1) that holds `box` whole: the smallest such tile (the most zoom), of
    those the one whose centre is nearest the box's; 0 (the whole image) when none does."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    eps = 1e-6
    holding = [t for t, (x0, y0, x1, y1) in enumerate(boxes) if t > 0 and x0 - eps <= box[0] and y0 - eps <= box[1]
               and box[2] <= x1 + eps and box[3] <= y1 + eps]
    def area(t: int) -> float:  # rounded: tiles of one grid tie
        return round((boxes[t][2] - boxes[t][0]) * (boxes[t][3] - boxes[t][1]), 6)

    return min(holding, key=lambda t: (area(t), ((boxes[t][0] + boxes[t][2]) / 2 - cx) ** 2 + ((boxes[t][1] + boxes[t][3]) / 2 - cy) ** 2), default=0)


@torch.no_grad()
def ground_tiled(
    model: Inference, images: torch.Tensor, texts: torch.Tensor, grid: int | Sequence[int], overlap: float = 0.25, grounding_map: str | None = None
) -> Grounding:
    """Coarse to fine: `Inference.ground` on the whole image, then again inside the tile that
    holds the box found (`containing_tile`), when one does. images (B, 3, S, S) normalised,
    texts (B, D). A product too large for a tile keeps its whole-image box; a small one is
    grounded at the tile's larger scale. The heat map is the tile's, pasted into the whole
    image's frame (zero elsewhere); boxes are fractions of the whole image."""
    boxes = tile_boxes(grid, overlap)
    encoding = model.encode_image(crop_tiles(images, boxes))
    return ground_tiled_from(model, encoding, boxes, texts, tuple(images.shape[-2:]), grounding_map)


def ground_tiled_from(
    model: Inference, encoding: ImageEncoding, boxes: list[Box], texts: torch.Tensor, size: tuple[int, int], grounding_map: str | None = None
) -> Grounding:
    """`ground_tiled` from the encoding of the images' tiles (`boxes`, tile-major)."""
    tiles, h, w = len(boxes), size[0], size[1]
    first = torch.arange(len(texts), device=texts.device) * tiles
    whole_maps, _ = model.heatmaps_from(encoding.take(first), texts, grounding_map)
    whole = upsample_heatmap(whole_maps, (h, w)).float().cpu().numpy()
    tile = [containing_tile(model.box_from_heatmap(m, grounding_map), boxes) for m in whole]
    maps, index = model.heatmaps_from(encoding.take(first + torch.tensor(tile, device=first.device)), texts, grounding_map)
    tile_maps = upsample_heatmap(maps, (h, w)).float().cpu()
    heatmaps = torch.zeros(len(texts), h, w)
    found = []
    for b, t in enumerate(tile):
        x0, y0, x1, y1 = boxes[t]
        top, left = round(y0 * h), round(x0 * w)
        bottom, right = max(round(y1 * h), top + 1), max(round(x1 * w), left + 1)
        pasted = F.interpolate(tile_maps[b][None, None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)
        heatmaps[b, top:bottom, left:right] = pasted[0, 0]
        found.append(box_in_image(model.box_from_heatmap(tile_maps[b].numpy(), grounding_map), boxes[t]))
    return Grounding(heatmaps=heatmaps, boxes=found, query_index=index)
