"""The lexical side of product search: BM25 (`bm25s`, English stop words, Snowball stemming) over
each product's title, category and attribute values, and (weighted) reciprocal rank fusion
with the dense ranking.

The BM25 index is derived data: built from the index's product metadata on the first lexical
query and rebuilt on the first query after an `add` (a removed product is masked out at once,
no rebuild), so nothing extra is saved and a loaded index needs no other file.
"""

from __future__ import annotations

import threading

import numpy as np

try:
    import bm25s
    import Stemmer
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("eclip's lexical search needs bm25s and PyStemmer: pip install 'eclip[search]'") from error

from .filters import product_facets

RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009): 1 / (60 + rank)
MODES = ("dense", "lexical", "hybrid")


def document(meta: dict) -> str:
    """The text BM25 indexes for a product: its title and its facet values."""
    parts = [str(meta.get("title") or "")]
    parts += [str(v) for v in product_facets(meta).values() if isinstance(v, str)]
    return " ".join(p for p in parts if p)


class LexicalIndex:
    """BM25 over products; `search` takes a per-document mask (filters, removals)."""

    def __init__(self):
        self._stemmer = Stemmer.Stemmer("english")
        self._lock = threading.Lock()
        self._bm25: bm25s.BM25 | None = None
        self.product_ids: list[str] = []
        self.vector_ids = np.zeros(0, dtype=np.int64)  # document -> its product's first vector id
        self.stale = True

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)

    def ensure(self, products: dict[str, dict], first_vector: dict[str, list[int]]) -> None:
        """Rebuild if stale, from every product's metadata (the caller holds the index's lock)."""
        with self._lock:
            if not self.stale:
                return
            pids = list(products)
            bm25 = None
            if pids:
                bm25 = bm25s.BM25()
                bm25.index(self._tokens([document(products[p]) for p in pids]), show_progress=False)
            self._bm25, self.product_ids = bm25, pids
            self.vector_ids = np.array([first_vector[p][0] for p in pids], dtype=np.int64)
            self.stale = False

    def search(self, text: str, k: int, allowed: np.ndarray) -> list[tuple[str, float]]:
        """Up to k (product id, BM25 score) with a positive score, best first; `allowed` is a
        boolean mask over vector ids (a document counts if its first vector is allowed)."""
        if self._bm25 is None or k <= 0:
            return []
        tokens = self._tokens([text])
        if not tokens[0]:
            return []
        mask = allowed[self.vector_ids].astype(np.float32)
        k = min(k, len(self.product_ids))
        docs, scores = self._bm25.retrieve(tokens, k=k, show_progress=False, weight_mask=mask, n_threads=1)
        return [(self.product_ids[d], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def reciprocal_rank_fusion(
    rankings: list[list[str]], k: int, constant: int = RRF_K, weights: list[float] | None = None
) -> list[tuple[str, float]]:
    """Fuse rankings of ids: score(id) = sum over rankings of weight / (constant + rank), rank
    from 1; `weights` one per ranking (default 1 each)."""
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    scores: dict[str, float] = {}
    for weight, ranking in zip(weights, rankings):
        for rank, pid in enumerate(ranking, start=1):
            scores[pid] = scores.get(pid, 0.0) + weight / (constant + rank)
    return sorted(scores.items(), key=lambda item: -item[1])[:k]
