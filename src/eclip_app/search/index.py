"""A FAISS index of products, addressed by string product id.

Inner product over L2-normalised vectors, one vector per image, results per distinct product
(a product scores by its best photo). `kind="auto"` picks flat, HNSW or IVF-PQ from the size
and the memory budget (`choose_kind`); products are added and removed by id without a rebuild;
saved atomically without pickle. The design and its reasons: docs/search.md.
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import faiss
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("eclip's product index needs faiss: pip install 'eclip[search]' (or faiss-cpu / faiss-gpu)") from error
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eclip.atomic import atomic_folder

from .filters import FacetColumns, parse_filters
from .lexical import LexicalIndex

FORMAT = "eclip-product-index"
FORMAT_VERSION = 1
KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX_VECTORS = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # recall@10 0.96 at 1M clustered 512-d vectors, 0.995 at 100k
IVF_NPROBE = 32
# 4 GiB: HNSW up to about 1.8M 512-d vectors (1M needs about 2.2 GiB), the index that meets
# recall@10 >= 0.95 there; IVF-PQ (recall about 0.75-0.8) only when the budget says so
DEFAULT_MEMORY_BUDGET_MB = 4096
TOMBSTONE_REBUILD_FRACTION = 0.5
# Filtered search: a filter that selects at most EXACT_FILTER_VECTORS vectors is searched
# exactly (a scan of the selected ids only, cost ~ their number); a wider one by the index with
# an id selector, HNSW's efSearch (IVF-PQ's nprobe) raised to efSearch / selectivity^0.7, since
# a thin selection needs a wider beam for the same recall (measured: benchmarks/filtered_search.py,
# BENCHMARKS.md).
EXACT_FILTER_VECTORS = 20_000
FILTER_EF_EXPONENT = 0.7
FILES = ("index.faiss", "vectors.parquet", "products.parquet", "index.json")


class _ReadWriteLock:
    """Many concurrent searches (FAISS reads are thread-safe), one writer at a time (FAISS
    writes are not): a web service keeps answering in parallel while a product is updated."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class IndexFolderError(ValueError):
    """A folder that is not (or no longer) a readable product index."""


@dataclass(frozen=True)
class Hit:
    product_id: str
    score: float
    image_path: str | None  # the product's photo whose vector matched best


def _pq_bytes_options(dim: int) -> list[int]:
    """Code sizes (bytes per vector) that IVF-PQ can use for this dimension, largest first."""
    return [m for m in (128, 64, 48, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim]


def estimate_bytes(kind: str, n: int, dim: int, pq_m: int | None = None) -> int:
    """Memory of the FAISS index plus our per-vector id maps (two object slots, 16 bytes)."""
    ours = 16 * n
    if kind == "flat":
        return n * (4 * dim + 8) + ours  # vectors + IndexIDMap's id array
    if kind == "hnsw":
        # vectors + level-0 links (2M int32) + upper levels (about M/(M-1) links per vector,
        # rounded up to one level of M) + levels/offsets bookkeeping
        return n * (4 * dim + 4 * 2 * HNSW_M + 4 * HNSW_M // 8 + 16) + ours
    if kind == "ivfpq":
        m = pq_m or _pq_bytes_options(dim)[0]
        nlist = _nlist(n)
        return n * (m + 8) + nlist * dim * 4 + 256 * dim * 4 + ours  # codes+ids, centroids, PQ tables
    raise ValueError(f"unknown index kind {kind!r}")


def _nlist(n: int) -> int:
    # about 2 sqrt(n) lists (2,000 at 1M: k-means stays at a minute or two on 2 cores), with at
    # least 39 training points per list (FAISS's k-means minimum)
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def choose_kind(n: int, dim: int, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> tuple[str, dict]:
    """The auto rule (module docstring): returns the kind and its parameters."""
    budget = memory_budget_mb * 2**20
    if n < FLAT_MAX_VECTORS and estimate_bytes("flat", n, dim) <= budget:
        return "flat", {}
    if estimate_bytes("hnsw", n, dim) <= budget:
        return "hnsw", {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    for m in _pq_bytes_options(dim):
        if estimate_bytes("ivfpq", n, dim, m) <= budget:
            return "ivfpq", {"pq_m": m}
    smallest = estimate_bytes("ivfpq", n, dim, _pq_bytes_options(dim)[-1])
    raise ValueError(
        f"{n} vectors of dimension {dim} do not fit a {memory_budget_mb:g} MB budget with any index "
        f"(the smallest, IVF-PQ at {_pq_bytes_options(dim)[-1]} byte(s) per vector, needs about {smallest / 2**20:.0f} MB)"
    )


def _normalised(vectors: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]} but the index has dimension {dim} (built from another model or field?)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1)
    if np.all(np.abs(norms - 1) < 1e-4):
        return x  # already unit length: no 2 GiB copy at 1M vectors
    return x / np.maximum(norms, 1e-12)[:, None]


class ProductIndex:
    """Top-k products for query vectors; add, update and delete products by id (module doc)."""

    def __init__(self, index: faiss.Index, kind: str, dim: int, params: dict, info: dict | None = None):
        self._index = index
        self.kind = kind
        self.dim = dim
        self.params = params
        self.info: dict = dict(info or {})  # provenance (model, field, embeddings folder)
        self._lock = _ReadWriteLock()
        self._next_id = 0
        self._vec_pid = np.empty(0, dtype=object)  # vector id -> product id (None: removed)
        self._vec_path = np.empty(0, dtype=object)  # vector id -> image path
        self._products: dict[str, dict] = {}  # product id -> metadata
        self._product_vecs: dict[str, list[int]] = {}  # product id -> its vector ids
        self._live_vectors = 0
        self._facets = FacetColumns()  # filters and facet counts over vector ids
        self._lexical = LexicalIndex()  # BM25 over titles and attributes, rebuilt when stale

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        product_ids: list[str],
        metadata: list[dict],
        kind: str = "auto",
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        info: dict | None = None,
        params: dict | None = None,
    ) -> ProductIndex:
        """Rows of `vectors` are images; rows sharing a product id belong to one product.
        `metadata[i]` describes row i's product (title, category, attributes, ...); an
        `image_path` key is the row's photo and the product's `image_paths` collect them.
        `params` overrides the kind's parameters (M, ef_construction, ef_search; pq_m, nprobe)."""
        x = _normalised(vectors)
        n, dim = x.shape
        if n == 0:
            raise ValueError("cannot build an index from zero vectors")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        overrides = params
        if kind == "auto":
            kind, params = choose_kind(n, dim, memory_budget_mb)
        elif kind == "hnsw":
            params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        elif kind == "ivfpq":
            options = [m for m in _pq_bytes_options(dim) if estimate_bytes("ivfpq", n, dim, m) <= memory_budget_mb * 2**20]
            params = {"pq_m": (options or _pq_bytes_options(dim))[0]}
        else:
            params = {}
        params = params | dict(overrides or {})
        index = cls._new_faiss(kind, dim, params, x)
        self = cls(index, kind, dim, params, info)
        self.add(x, product_ids, metadata)
        return self

    @staticmethod
    def _new_faiss(kind: str, dim: int, params: dict, train: np.ndarray) -> faiss.Index:
        if kind == "flat":
            return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
            index.hnsw.efSearch = params["ef_search"]
            return index
        if kind == "ivfpq":
            n = len(train)
            if n < 64:
                raise ValueError(f"an IVF-PQ index needs at least 64 vectors to train, got {n}; use kind 'flat'")
            nlist = _nlist(n)
            nbits = 8 if n >= 39 * 256 else 4  # k-means wants >= 39 points per centroid
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, params["pq_m"], nbits, faiss.METRIC_INNER_PRODUCT)
            params.setdefault("nprobe", min(IVF_NPROBE, nlist))
            params.update(nlist=nlist, nbits=nbits)
            # k-means on a sample: 40 points per list (FAISS wants 39) keeps 1M builds in
            # minutes; the m sub-quantisers train on 40 points per centroid too (FAISS's
            # default of 256 costs minutes on 2 cores for no measurable recall)
            sample = train
            if n > 40 * nlist:
                pick = np.random.default_rng(0).choice(n, 40 * nlist, replace=False)
                sample = train[np.sort(pick)]
            index.pq.cp.max_points_per_centroid = 40
            index.train(sample)
            index.nprobe = params["nprobe"]
            return index  # faiss's Python wrapper keeps `quantizer` alive with the index
        raise ValueError(f"unknown index kind {kind!r}")

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of products."""
        return len(self._products)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._products

    @property
    def num_vectors(self) -> int:
        return self._live_vectors

    @property
    def num_tombstones(self) -> int:
        return int(self._index.ntotal) - self._live_vectors

    def product_ids(self) -> list[str]:
        return list(self._products)

    def metadata(self, product_id: str) -> dict:
        try:
            return dict(self._products[product_id])
        except KeyError:
            raise KeyError(f"product {product_id!r} is not in the index") from None

    def search(self, queries: np.ndarray, k: int = 10, filters=None) -> list[list[tuple[str, float]]]:
        """Per query: up to k (product_id, score) pairs, best first, distinct products.
        `filters`: facet conditions (`filters.parse_filters`), all of which a result meets."""
        return [[(h.product_id, h.score) for h in hits] for hits in self.search_hits(queries, k, filters)]

    def search_hits(self, queries: np.ndarray, k: int = 10, filters=None) -> list[list[Hit]]:
        """Like `search`, with the matched photo of each product."""
        q = _normalised(queries, self.dim, "queries")
        conditions = parse_filters(filters)
        with self._lock.read():
            selector, exact = None, False
            live_vectors, products = self._live_vectors, len(self._products)
            if conditions:
                self._facets.check(conditions)
                mask = self._facets.mask(conditions, self._next_id)
                live_vectors = int(mask.sum())
                products = int((mask & self._facets.primary[: self._next_id]).sum())
                exact = live_vectors <= EXACT_FILTER_VECTORS
                bits = np.packbits(mask, bitorder="little")
                selector = (faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits)  # n in bytes; bits live as long
            k = min(int(k), products)
            if k <= 0:
                return [[] for _ in range(len(q))]
            # a selector passes only live selected vectors; without one, tombstones come back too
            ntotal = live_vectors if conditions else int(self._index.ntotal)
            # enough vectors for k products on average, plus the tombstones' share
            per_product = max(1.0, live_vectors / products)
            fetch = min(ntotal, math.ceil(k * per_product * ntotal / max(1, live_vectors)) + k)
            results: list[list[Hit] | None] = [None] * len(q)
            todo = np.arange(len(q))
            while len(todo):
                scores, ids = self._faiss_search(q[todo], fetch, None if selector is None else selector[0], exact,
                                                 live_vectors / max(1, self._live_vectors))
                retry = []
                for row, qi in enumerate(todo):
                    hits = self._aggregate(scores[row], ids[row], k)
                    if len(hits) < k and fetch < ntotal:
                        retry.append(qi)
                    else:
                        results[qi] = hits
                todo = np.array(retry, dtype=np.int64)
                fetch = min(ntotal, fetch * 4)
            return results  # type: ignore[return-value]

    def _faiss_search(self, q: np.ndarray, fetch: int, selector=None, exact: bool = False,
                      selectivity: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        # per-call parameters instead of setting index fields: safe under concurrent searches
        if self.kind == "hnsw":
            if exact:  # the graph's flat storage, positions = ids: a scan of the selected vectors
                return self._index.storage.search(q, fetch, params=faiss.SearchParameters(sel=selector))
            ef = math.ceil(max(self.params["ef_search"], fetch) / max(selectivity, 1e-6) ** FILTER_EF_EXPONENT)
            params = faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
            return self._index.search(q, fetch, params=params)
        if self.kind == "ivfpq":
            # the same widening for the lists probed; exact: every list
            nprobe = self.params["nlist"] if exact else min(
                self.params["nlist"], math.ceil(self.params["nprobe"] / max(selectivity, 1e-6) ** FILTER_EF_EXPONENT))
            params = faiss.SearchParametersIVF(nprobe=nprobe, max_codes=0, sel=selector)
            return self._index.search(q, fetch, params=params)
        if selector is not None:
            return self._index.search(q, fetch, params=faiss.SearchParameters(sel=selector))
        return self._index.search(q, fetch)

    def facet_counts(self, filters=None) -> dict[str, dict[str, int]]:
        """Products per facet value under `filters` (a facet's own condition left out of its
        counts: `FacetColumns.counts`)."""
        conditions = parse_filters(filters)
        with self._lock.read():
            self._facets.check(conditions)
            return self._facets.counts(conditions, self._next_id)

    def search_lexical(self, text: str, k: int = 10, filters=None) -> list[tuple[str, float]]:
        """Up to k (product_id, BM25 score) for a text over titles and attributes, best first;
        products with no query word are not returned."""
        conditions = parse_filters(filters)
        with self._lock.read():
            self._facets.check(conditions)
            self._lexical.ensure(self._products, self._product_vecs)
            allowed = self._facets.mask(conditions, self._next_id)
            return self._lexical.search(text, int(k), allowed)

    def _aggregate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Hit]:
        """Vector hits (best first) -> the first k distinct live products, each at its best."""
        valid = ids >= 0  # FAISS pads with -1 when it finds fewer
        ids, scores = ids[valid], scores[valid]
        pids = self._vec_pid[ids]
        paths = self._vec_path[ids]
        hits: list[Hit] = []
        seen: set[str] = set()
        for pid, score, path in zip(pids, scores, paths):
            if pid is None or pid in seen:  # tombstone, or a lower-ranked photo of a product
                continue
            seen.add(pid)
            hits.append(Hit(pid, float(score), path))
            if len(hits) == k:
                break
        return hits

    # ------------------------------------------------------------------ updates

    def add(self, vectors: np.ndarray, product_ids: list[str], metadata: list[dict]) -> None:
        """Add products; a product id already present is replaced (its old vectors go)."""
        x = _normalised(vectors, self.dim)
        product_ids = [str(p) for p in product_ids]
        if not (len(x) == len(product_ids) == len(metadata)):
            raise ValueError(f"vectors ({len(x)}), product_ids ({len(product_ids)}) and metadata ({len(metadata)}) must have the same length")
        if any(not p for p in product_ids):
            raise ValueError("empty product id")
        with self._lock.write():
            existing = [p for p in dict.fromkeys(product_ids) if p in self._products]
            if existing:
                self._remove_locked(existing, allow_rebuild=False)
            ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
            if self.kind == "hnsw":
                assert self._next_id == self._index.ntotal  # ids are HNSW positions
                self._index.add(x)
            else:
                self._index.add_with_ids(x, ids)
            self._grow(self._next_id + len(x))
            self._next_id += len(x)
            new_meta: dict[str, dict] = {}
            paths: dict[str, list[str]] = {}
            for vid, pid, meta in zip(ids.tolist(), product_ids, metadata):
                meta = dict(meta or {})
                path = meta.pop("image_path", None)
                new_meta.setdefault(pid, {}).update(meta)
                if path is not None:
                    paths.setdefault(pid, []).append(str(path))
                self._vec_pid[vid] = pid
                self._vec_path[vid] = None if path is None else str(path)
                self._product_vecs.setdefault(pid, []).append(vid)
            for pid, meta in new_meta.items():
                if "image_paths" not in meta:
                    meta["image_paths"] = paths.get(pid, [])
                self._products[pid] = meta
            self._live_vectors += len(x)
            self._facets.grow(self._next_id)
            self._facets.set_products([(self._product_vecs[pid], meta) for pid, meta in new_meta.items()])
            self._lexical.stale = True

    def remove(self, product_ids) -> int:
        """Delete products by id; unknown ids are ignored. Returns how many were removed."""
        if isinstance(product_ids, str):
            product_ids = [product_ids]
        with self._lock.write():
            return self._remove_locked([str(p) for p in product_ids], allow_rebuild=True)

    def _remove_locked(self, product_ids: list[str], allow_rebuild: bool) -> int:
        vids: list[int] = []
        removed = 0
        for pid in dict.fromkeys(product_ids):
            if pid not in self._products:
                continue
            del self._products[pid]
            vids.extend(self._product_vecs.pop(pid))
            removed += 1
        if not vids:
            return removed
        ids = np.array(vids, dtype=np.int64)
        self._vec_pid[ids] = None
        self._vec_path[ids] = None
        self._facets.clear(ids)  # the lexical index masks removed products by their vectors
        self._live_vectors -= len(ids)
        if self.kind != "hnsw":
            self._index.remove_ids(ids)
        elif allow_rebuild and self.num_tombstones > TOMBSTONE_REBUILD_FRACTION * self._index.ntotal:
            self._compact_locked()
        return removed

    def compact(self) -> None:
        """Rebuild an HNSW graph from its live vectors, dropping tombstones (renumbers ids)."""
        with self._lock.write():
            self._compact_locked()

    def _compact_locked(self) -> None:
        if self.kind != "hnsw" or self.num_tombstones == 0:
            return
        live = np.flatnonzero(np.array([p is not None for p in self._vec_pid[: self._next_id]], dtype=bool))
        if len(live):
            vectors = self._index.reconstruct_batch(live.astype(np.int64))
        else:
            vectors = np.zeros((0, self.dim), dtype=np.float32)
        index = self._new_faiss(self.kind, self.dim, self.params, vectors)
        if len(vectors):
            index.add(vectors)
        remap = {int(old): new for new, old in enumerate(live)}
        self._index = index
        self._vec_pid = self._vec_pid[live].copy()
        self._vec_path = self._vec_path[live].copy()
        self._next_id = len(live)
        self._product_vecs = {pid: [remap[v] for v in vs] for pid, vs in self._product_vecs.items()}
        self._facets.keep(live)
        self._lexical.stale = True  # its documents point at the old vector ids

    def _grow(self, size: int) -> None:
        if size <= len(self._vec_pid):
            return
        capacity = max(size, 2 * len(self._vec_pid), 1024)
        for name in ("_vec_pid", "_vec_path"):
            old = getattr(self, name)
            new = np.empty(capacity, dtype=object)
            new[: len(old)] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ files

    def save(self, folder) -> None:
        """Write the index folder atomically: a temporary sibling folder, then a rename."""
        with atomic_folder(folder) as tmp, self._lock.read():  # searches may go on while saving; updates wait
            faiss.write_index(self._index, str(tmp / "index.faiss"))
            live = [v for v in range(self._next_id) if self._vec_pid[v] is not None]
            vectors = pa.table({
                "id": pa.array(live, type=pa.int64()),
                "product_id": pa.array([self._vec_pid[v] for v in live], type=pa.string()),
                "image_path": pa.array([self._vec_path[v] for v in live], type=pa.string()),
            })
            pq.write_table(vectors, tmp / "vectors.parquet")
            products = pa.table({
                "product_id": pa.array(list(self._products), type=pa.string()),
                "metadata": pa.array([json.dumps(m, ensure_ascii=False) for m in self._products.values()], type=pa.string()),
            })
            pq.write_table(products, tmp / "products.parquet")
            header = {
                "format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "params": self.params, "next_id": self._next_id, "products": len(self._products),
                "vectors": self._live_vectors, "faiss_ntotal": int(self._index.ntotal), "info": self.info,
            }
            # index.json last: a folder with it is complete (the rename makes it atomic anyway)
            (tmp / "index.json").write_text(json.dumps(header, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder) -> ProductIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise IndexFolderError(f"index folder {folder} does not exist (build one with `eclip index`)")
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise IndexFolderError(f"{folder} is not a product index: missing {', '.join(missing)}")
        header = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        if header.get("format") != FORMAT:
            raise IndexFolderError(f"{folder}/index.json is not an eclip product index")
        if header.get("version") != FORMAT_VERSION:
            raise IndexFolderError(f"{folder}: index format version {header.get('version')}, this code reads {FORMAT_VERSION}; rebuild it")
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.d != header["dim"]:
            raise IndexFolderError(f"{folder}: index.faiss has dimension {index.d}, index.json says {header['dim']}")
        self = cls(index, header["kind"], int(header["dim"]), header["params"], header.get("info"))
        if self.kind == "ivfpq":
            index.nprobe = self.params["nprobe"]
        vectors = pq.read_table(folder / "vectors.parquet")
        products = pq.read_table(folder / "products.parquet")
        self._next_id = int(header["next_id"])
        self._grow(self._next_id)
        ids = vectors.column("id").to_numpy()
        pids = vectors.column("product_id").to_pylist()
        self._vec_pid[ids] = np.array(pids, dtype=object)
        self._vec_path[ids] = np.array(vectors.column("image_path").to_pylist(), dtype=object)
        for pid, vid in zip(pids, ids.tolist()):
            self._product_vecs.setdefault(pid, []).append(vid)
        for pid, meta in zip(products.column("product_id").to_pylist(), products.column("metadata").to_pylist()):
            self._products[pid] = json.loads(meta)
        self._live_vectors = len(ids)
        # the facet columns are derived from the metadata, not stored
        self._facets.grow(self._next_id)
        self._facets.set_products([(self._product_vecs[pid], meta) for pid, meta in self._products.items()])
        return self

    def __repr__(self) -> str:
        return f"ProductIndex(kind={self.kind!r}, dim={self.dim}, products={len(self)}, vectors={self.num_vectors})"
