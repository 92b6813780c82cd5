"""A model plus a product index: search by text, by image, or by both; ground the query in a
result photo.

Queries are embedded into the space the index was built from (`index.info["field"]`, the
product embedding by default): text with the text tower, an image with `product_embedding`
(or the global embedding for a `--field global` index), preprocessed exactly as in training
(`to_uint8_tensor` at `model.image_size`, then `normalize`).

Image + text: the query photo may show several products, and the text says which one and what
should differ. The query vector is `eclip.retrieval.image_text_query`: the text-guided instance
(with an instance decoder) plus the text, renormalised; each modality weighs the same
(`text_weight` changes that).

Tiles (`tiles=N`, N >= 2): the query photo is also cut into N x N overlapping crops
(`eclip.tiling`), each read as an image, so a product a tenth of the photo is read at a larger
scale. Every tile is a query vector (with a text: the tile's text-guided query) and a product
scores its best match; grounding zooms into the tile that holds the whole image's box.

Modes (queries with a text): `dense` ranks by the embedding alone, `lexical` by BM25 over
titles and attributes alone, `hybrid` fuses the two rankings' top HYBRID_DEPTH by reciprocal
rank fusion, the dense term weighted by `dense_weight` (BM25's by 1). Every mode takes the
index's metadata `filters`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eclip.data.transforms import normalize
from eclip.io import load_model
from eclip.model.eclip import ECLIP
from eclip.model.inference import GroundResult
from eclip.retrieval import image_text_query
from eclip.tiling import (
    ground_tiled,
    pil_tiles,
    tile_boxes,
    tiled_hinted_vectors,
    tiled_product_vectors,
)

from .index import Hit, IndexFolderError, ProductIndex
from .lexical import MODES, reciprocal_rank_fusion

HYBRID_DEPTH = 50  # candidates taken from each ranking before fusion
# hybrid: weight of the dense ranking's RRF term (BM25's is 1): BM25's order leads, the embedding
# reorders near-ties and ranks what BM25 does not match (the choice: docs/results.md)
DENSE_WEIGHT = 0.02
DENSE_WEIGHT_RANGE = (0.001, 1000.0)


def check_dense_weight(value: float, name: str = "dense_weight") -> float:
    """`value` as a float if it is a usable hybrid dense weight, else ValueError naming it `name`."""
    low, high = DENSE_WEIGHT_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


@dataclass
class SearchRow:
    rank: int  # 1-based
    product_id: str
    score: float
    title: str | None
    image_path: str | None  # the product's photo that matched best (else its first photo)

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["GroundResult", "SearchRow", "Searcher"]


class Searcher:
    """Queries are encoded on the model's device (`model.device`); vectors come back as numpy."""

    def __init__(self, model: ECLIP, index: ProductIndex):
        if index.dim != model.config.embed_dim:
            raise IndexFolderError(
                f"the index holds {index.dim}-d vectors but the model embeds into {model.config.embed_dim}-d: "
                "was the index built from another model's embeddings?")
        self.model = model.eval()
        self.index = index
        self.field = index.info.get("field", "product")

    @classmethod
    def load(cls, model_folder: str | Path, index_folder: str | Path, device: str | None = None) -> Searcher:
        """`device`: None, CUDA when present, else the CPU."""
        index = ProductIndex.load(index_folder)  # first: its errors are cheaper than a model load
        return cls(load_model(model_folder, device=device), index)

    # ------------------------------------------------------------------ query vectors

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.model.preprocess(image) for image in images])

    @torch.inference_mode()
    def embed_text(self, text: str) -> np.ndarray:
        return self.model.encode_text([text])[0].float().cpu().numpy()

    def _tile_pixels(self, image: Image.Image, tiles: int) -> torch.Tensor:
        """(T, 3, S, S) the photo's tiles, cut at full resolution, normalised."""
        return normalize(pil_tiles(image.convert("RGB"), tile_boxes(tiles), self.model.image_size))

    @torch.inference_mode()
    def embed_image(self, image: Image.Image, tiles: int = 0) -> np.ndarray:
        """(D,) the photo's query vector, or (T, D) one per tile with tiles >= 2."""
        encoding = self.model.encode_image(self._tile_pixels(image, tiles) if tiles >= 2 else self._pixels([image]))
        readout = "global" if self.field == "global" else None
        vectors = tiled_product_vectors(self.model, encoding, 1, readout)[0]  # (T, D), T = 1 untiled
        return vectors.float().cpu().numpy() if tiles >= 2 else vectors[0].float().cpu().numpy()

    @torch.inference_mode()
    def embed_image_text(self, image: Image.Image, text: str, text_weight: float = 0.5, tiles: int = 0) -> np.ndarray:
        """normalise((1 - w) * image side + w * text), image side guided by the text (module doc)."""
        text_vec = self.model.encode_text([text])  # (1, D)
        if tiles >= 2:  # (T, D): each tile's text-guided query
            encoding = self.model.encode_image(self._tile_pixels(image, tiles))
            readout = "global" if self.field == "global" else None
            return tiled_hinted_vectors(self.model, encoding, text_vec, text_weight, readout)[0].float().cpu().numpy()
        encoding = self.model.encode_image(self._pixels([image]))
        query = image_text_query(self.model, encoding, text_vec, text_weight, self.field)
        return query[0].float().cpu().numpy()

    # ------------------------------------------------------------------ search

    def _dense_hits(self, vector: np.ndarray, k: int, filters=None) -> list[Hit]:
        """Top k hits for one query vector (D,), or for several (V, D): a product scores its best match."""
        if vector.ndim == 1:
            return self.index.search_hits(vector[None, :], k, filters)[0]
        best: dict[str, Hit] = {}
        for hits in self.index.search_hits(vector, k, filters):  # each vector's top k holds the merged top k
            for hit in hits:
                if hit.product_id not in best or hit.score > best[hit.product_id].score:
                    best[hit.product_id] = hit
        return sorted(best.values(), key=lambda hit: -hit.score)[:k]

    def search_vector(self, vector: np.ndarray, k: int = 10, filters=None) -> list[SearchRow]:
        """Top k for one query vector (D,), or for several (V, D): a product scores its best match."""
        return [self._row(rank, hit) for rank, hit in enumerate(self._dense_hits(vector, k, filters), start=1)]

    def _ranked(self, vector: Callable[[], np.ndarray], text: str | None, k: int, filters, mode: str,
                dense_weight: float = DENSE_WEIGHT) -> list[SearchRow]:
        """Dense, lexical or fused rows (module doc); `vector` embeds the query when needed."""
        dense_weight = check_dense_weight(dense_weight)
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "dense":
            return self.search_vector(vector(), k, filters)
        if text is None:
            raise ValueError(f"mode {mode!r} needs a query text")
        if mode == "lexical":
            hits = [Hit(pid, score, None) for pid, score in self.index.search_lexical(text, k, filters)]
        else:
            depth = max(k, HYBRID_DEPTH)
            dense = self._dense_hits(vector(), depth, filters)
            lexical = self.index.search_lexical(text, depth, filters)
            photos = {h.product_id: h.image_path for h in dense}
            fused = reciprocal_rank_fusion([[h.product_id for h in dense], [pid for pid, _ in lexical]], k,
                                           weights=[dense_weight, 1.0])
            hits = [Hit(pid, score, photos.get(pid)) for pid, score in fused]
        return [self._row(rank, hit) for rank, hit in enumerate(hits, start=1)]

    def facets(self, filters=None) -> dict[str, dict[str, int]]:
        """Products per facet value under `filters` (ProductIndex.facet_counts)."""
        return self.index.facet_counts(filters)

    def _row(self, rank: int, hit: Hit) -> SearchRow:
        meta = self.index.metadata(hit.product_id)
        path = hit.image_path or next(iter(meta.get("image_paths") or []), None)
        return SearchRow(rank, hit.product_id, hit.score, meta.get("title"), path)

    def search_text(self, text: str, k: int = 10, filters=None, mode: str = "dense",
                    dense_weight: float = DENSE_WEIGHT) -> list[SearchRow]:
        if not text or not text.strip():
            raise ValueError("empty query text")
        return self._ranked(lambda: self.embed_text(text), text, k, filters, mode, dense_weight)

    def search_image(self, image: Image.Image, k: int = 10, filters=None, tiles: int = 0) -> list[SearchRow]:
        return self.search_vector(self.embed_image(image, tiles), k, filters)

    def search_image_text(self, image: Image.Image, text: str, k: int = 10, text_weight: float = 0.5,
                          filters=None, mode: str = "dense", tiles: int = 0, dense_weight: float = DENSE_WEIGHT) -> list[SearchRow]:
        """`hybrid` fuses the image-plus-text ranking with BM25 of the text; `lexical` is BM25 alone."""
        if not text or not text.strip():
            raise ValueError("empty query text")
        return self._ranked(lambda: self.embed_image_text(image, text, text_weight, tiles), text, k, filters, mode, dense_weight)

    # ------------------------------------------------------------------ grounding

    def ground(self, image: Image.Image, text: str, tiles: int = 0) -> GroundResult:
        """Where in `image` is the product that `text` describes (`model.ground(image, text)`;
        with tiles >= 2, coarse to fine over the photo's tiles, `eclip.tiling.ground_tiled`)."""
        if tiles < 2:
            return self.model.ground(image, text)
        with torch.inference_mode():
            grounding = ground_tiled(self.model, self._pixels([image]), self.model.encode_text([text]), tiles)
        box = tuple(float(v) for v in grounding.boxes[0])
        w, h = image.size
        pixels = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
        heatmap = F.interpolate(grounding.heatmaps[:1, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        index = None if grounding.query_index is None else int(grounding.query_index[0])
        return GroundResult(box, pixels, heatmap.numpy(), index)  # type: ignore[arg-type]
