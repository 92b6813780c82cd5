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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eclip.io import load_model
from eclip.model.eclip import ECLIP
from eclip.model.inference import GroundResult
from eclip.retrieval import image_text_query

from .index import Hit, IndexFolderError, ProductIndex


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

    @torch.inference_mode()
    def embed_image(self, image: Image.Image) -> np.ndarray:
        encoding = self.model.encode_image(self._pixels([image]))
        vec = encoding.global_embedding if self.field == "global" else self.model.product_embedding_from(encoding)
        return vec[0].float().cpu().numpy()

    @torch.inference_mode()
    def embed_image_text(self, image: Image.Image, text: str, text_weight: float = 0.5) -> np.ndarray:
        """normalise((1 - w) * image side + w * text), image side guided by the text (module doc)."""
        encoding = self.model.encode_image(self._pixels([image]))
        text_vec = self.model.encode_text([text])  # (1, D)
        query = image_text_query(self.model, encoding, text_vec, text_weight, self.field)
        return query[0].float().cpu().numpy()

    # ------------------------------------------------------------------ search

    def search_vector(self, vector: np.ndarray, k: int = 10) -> list[SearchRow]:
        hits = self.index.search_hits(vector[None, :], k)[0]
        return [self._row(rank, hit) for rank, hit in enumerate(hits, start=1)]

    def _row(self, rank: int, hit: Hit) -> SearchRow:
        meta = self.index.metadata(hit.product_id)
        path = hit.image_path or next(iter(meta.get("image_paths") or []), None)
        return SearchRow(rank, hit.product_id, hit.score, meta.get("title"), path)

    def search_text(self, text: str, k: int = 10) -> list[SearchRow]:
        if not text or not text.strip():
            raise ValueError("empty query text")
        return self.search_vector(self.embed_text(text), k)

    def search_image(self, image: Image.Image, k: int = 10) -> list[SearchRow]:
        return self.search_vector(self.embed_image(image), k)

    def search_image_text(self, image: Image.Image, text: str, k: int = 10, text_weight: float = 0.5) -> list[SearchRow]:
        if not text or not text.strip():
            raise ValueError("empty query text")
        return self.search_vector(self.embed_image_text(image, text, text_weight), k)

    # ------------------------------------------------------------------ grounding

    def ground(self, image: Image.Image, text: str) -> GroundResult:
        """Where in `image` is the product that `text` describes (`model.ground(image, text)`)."""
        return self.model.ground(image, text)
