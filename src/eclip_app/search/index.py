"""A FAISS index of products, addressed by string product id.

Inner product over L2-normalised vectors, one vector per image, results per distinct product
(a product scores by its best photo). `kind="auto"` picks flat, HNSW or IVF-PQ from the size
and the memory budget (`choose_kind`); products are added and removed by id without a rebuild;
saved atomically without pickle, with the size and SHA-256 of each file in `index.json`;
`load` checks that the parts agree and raises `IndexFolderError` naming the one that does not.
The design and its reasons: docs/search.md.
"""

from __future__ import annotations

import hashlib
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

from eclip.atomic import atomic_folder, recover_folder

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
DATA_FILES = FILES[:3]  # the parts index.json fingerprints
# the FAISS class each kind is saved as (read_index returns the most derived class)
FAISS_CLASSES = {"flat": "IndexIDMap", "hnsw": "IndexHNSWFlat", "ivfpq": "IndexIVFPQ"}


class _ReadWriteLock:
    """Many concurrent searches (FAISS reads are thread-safe), one writer at a time (FAISS
    writes are not): a web service keeps answering in parallel while a product is updated."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def read(self):
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _read_parquet(path: Path, columns: dict[str, pa.DataType], fail) -> pa.Table:
    """A Parquet part with the columns (and types) an index needs, else `fail(message)`."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        fail(f"{path.name} is not a readable Parquet file ({error})")
    for name, kind in columns.items():
        if name not in table.column_names or table.schema.field(name).type != kind:
            fail(f"{path.name} has no {kind} column {name!r}")
    return table


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
    if len(x) == 1:  # one query (a web request): plain floats, no array round trips
        norm = math.sqrt(float(np.dot(x[0], x[0])))
        if abs(norm - 1) < 1e-4:
            return x
        if not math.isfinite(norm) and not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return x / max(norm, 1e-12)
    # one pass for both checks: a NaN or infinity anywhere makes its row's norm non-finite (and
    # huge finite values that overflow the square are told apart by the explicit check)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if not np.isfinite(norms).all() and not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
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
        # FAISS search parameters by value, built once: they are read-only during a search, so
        # concurrent searches share them (building one per call costs a tenth of a search)
        self._search_params: dict[tuple, faiss.SearchParameters] = {}
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

    def image_base(self) -> Path | None:
        """The folder relative image paths are relative to: the catalog's folder (recorded at
        index time). Index folders built since paths are stored absolute have none."""
        if self.info.get("image_root"):
            return Path(self.info["image_root"])
        if self.info.get("catalog"):
            return Path(self.info["catalog"]).parent
        return None

    def metadata(self, product_id: str) -> dict:
        try:
            return dict(self._products[product_id])
        except KeyError:
            raise KeyError(f"product {product_id!r} is not in the index") from None

    def search(self, queries: np.ndarray, k: int = 10, filters=None) -> list[list[tuple[str, float]]]:
        """Per query: up to k (product_id, score) pairs, best first, distinct products.
        `filters`: facet conditions (`filters.parse_filters`), all of which a result meets."""
        return [[(pid, score) for pid, score, _ in rows] for rows in self._search_rows(queries, k, filters)]

    def search_hits(self, queries: np.ndarray, k: int = 10, filters=None) -> list[list[Hit]]:
        """Like `search`, with the matched photo of each product."""
        return [[Hit(*row) for row in rows] for rows in self._search_rows(queries, k, filters)]

    def _search_rows(self, queries: np.ndarray, k: int, filters=None) -> list[list[tuple[str, float, str | None]]]:
        """Per query: up to k (product_id, score, image_path), best first, distinct products."""
        q = _normalised(queries, self.dim, "queries")
        conditions = parse_filters(filters)
        self._lock.acquire_read()
        try:
            selector, exact, scan_ids = None, False, None
            live_vectors, products = self._live_vectors, len(self._products)
            if conditions:
                self._facets.check(conditions)
                mask = self._facets.mask(conditions, self._next_id)
                live_vectors = int(mask.sum())
                products = int((mask & self._facets.primary[: self._next_id]).sum())
                exact = live_vectors <= EXACT_FILTER_VECTORS
                if exact and self.kind == "hnsw":  # positions = ids: score the selected vectors only
                    scan_ids = np.flatnonzero(mask)
                else:
                    bits = np.packbits(mask, bitorder="little")
                    selector = (faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits)  # n in bytes; bits live as long
            k = min(int(k), products)
            if k <= 0:
                return [[] for _ in range(len(q))]
            # a selector passes only live selected vectors; without one, tombstones come back too
            ntotal = live_vectors if conditions else int(self._index.ntotal)
            if live_vectors == ntotal == products:
                fetch = k  # one live vector per product: k vectors are k products
            else:
                # enough vectors for k products on average, plus the tombstones' share and a margin
                per_product = max(1.0, live_vectors / products)
                fetch = min(ntotal, math.ceil(k * per_product * ntotal / max(1, live_vectors)) + k)
            selectivity = live_vectors / max(1, self._live_vectors)
            results: list[list | None] = [None] * len(q)
            todo, batch = list(range(len(q))), q
            while todo:
                if scan_ids is not None:
                    scores, ids = self._scan_selected(batch, scan_ids, fetch)
                else:
                    scores, ids = self._faiss_search(batch, fetch, None if selector is None else selector[0], exact, selectivity)
                retry = []
                for row, qi in enumerate(todo):
                    hits = self._aggregate(scores[row], ids[row], k)
                    if len(hits) < k and fetch < ntotal:
                        retry.append(qi)
                    else:
                        results[qi] = hits
                todo, batch = retry, q[retry]
                fetch = min(ntotal, fetch * 4)
            return results  # type: ignore[return-value]
        finally:
            self._lock.release_read()

    def _scan_selected(self, q: np.ndarray, ids: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the queries with the HNSW storage's vectors at `ids` (a
        gather of the selected rows: a FAISS selector over the flat storage would visit every
        vector), top `fetch` per query, best first, as FAISS returns them."""
        storage = faiss.downcast_index(self._index.storage)
        stored = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * self.dim).reshape(storage.ntotal, self.dim)
        scores = q @ stored[ids].T  # (Q, S), a view of the index's memory: read under the read lock
        fetch = min(fetch, len(ids))
        top = np.argpartition(-scores, fetch - 1, axis=1)[:, :fetch]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"), axis=1)
        return np.take_along_axis(scores, top, axis=1), ids[top]

    def _faiss_search(self, q: np.ndarray, fetch: int, selector=None, exact: bool = False,
                      selectivity: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        # per-call parameters instead of setting index fields: safe under concurrent searches;
        # without a filter they are cached by value (the common path), with one they carry it
        if self.kind == "hnsw":
            if selector is None:
                ef = max(self.params["ef_search"], fetch)
                params = self._search_params.get(("hnsw", ef))
                if params is None:
                    params = self._cache_params(("hnsw", ef), faiss.SearchParametersHNSW(efSearch=ef))
                return self._index.search(q, fetch, params=params)
            ef = math.ceil(max(self.params["ef_search"], fetch) / max(selectivity, 1e-6) ** FILTER_EF_EXPONENT)
            return self._index.search(q, fetch, params=faiss.SearchParametersHNSW(efSearch=ef, sel=selector))
        if self.kind == "ivfpq":
            if selector is None:
                nprobe = self.params["nprobe"]
                params = self._search_params.get(("ivfpq", nprobe))
                if params is None:
                    params = self._cache_params(("ivfpq", nprobe), faiss.SearchParametersIVF(nprobe=nprobe, max_codes=0))
                return self._index.search(q, fetch, params=params)
            # the same widening for the lists probed; exact: every list
            nprobe = self.params["nlist"] if exact else min(
                self.params["nlist"], math.ceil(self.params["nprobe"] / max(selectivity, 1e-6) ** FILTER_EF_EXPONENT))
            return self._index.search(q, fetch, params=faiss.SearchParametersIVF(nprobe=nprobe, max_codes=0, sel=selector))
        if selector is not None:
            return self._index.search(q, fetch, params=faiss.SearchParameters(sel=selector))
        return self._index.search(q, fetch)

    def _cache_params(self, key: tuple, params: faiss.SearchParameters) -> faiss.SearchParameters:
        if len(self._search_params) >= 64:  # efSearch follows the fetch size: keep the cache small
            self._search_params = {}
        self._search_params[key] = params
        return params

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

    def _aggregate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[tuple[str, float, str | None]]:
        """Vector hits (best first) -> the first k distinct live products, each at its best."""
        if ids.min() < 0:  # FAISS pads with -1 when it finds fewer
            valid = ids >= 0
            ids, scores = ids[valid], scores[valid]
        pids = self._vec_pid[ids].tolist()
        paths = self._vec_path[ids].tolist()
        rows = list(zip(pids, scores.tolist(), paths))
        if len(rows) <= k and len(set(pids)) == len(pids) and None not in pids:
            return rows  # distinct live products already (one vector per product): nothing to skip
        hits: list[tuple[str, float, str | None]] = []
        seen: set[str] = set()
        for row in rows:
            pid = row[0]
            if pid is None or pid in seen:  # tombstone, or a lower-ranked photo of a product
                continue
            seen.add(pid)
            hits.append(row)
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
                # the fingerprint: a part from another index, or one cut short, no longer matches
                "files": {name: _file_digest(tmp / name) for name in DATA_FILES},
            }
            # index.json last: a folder with it is complete (the rename makes it atomic anyway)
            (tmp / "index.json").write_text(json.dumps(header, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder, verify: bool = True) -> ProductIndex:
        """Read an index folder, checking that its parts agree: the files against the sizes and
        SHA-256 written at save (`verify=False` skips the hashing, not the sizes), then counts,
        ids, dimension and the FAISS class. Any disagreement, missing or unreadable part is one
        IndexFolderError naming it. Folders saved before the fingerprint get every other check.
        A replace of the folder cut short by a kill is finished or undone first (`recover_folder`)."""
        folder = Path(folder)
        recover_folder(folder)
        if not folder.is_dir():
            raise IndexFolderError(f"index folder {folder} does not exist (build one with `eclip index`)")
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise IndexFolderError(f"{folder} is not a product index: missing {', '.join(missing)}")
        try:
            return cls._load_checked(folder, verify)
        except IndexFolderError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as error:
            raise IndexFolderError(f"{folder}: cannot read the index ({type(error).__name__}: {error}); rebuild it with `eclip index`") from error

    @classmethod
    def _load_checked(cls, folder: Path, verify: bool) -> ProductIndex:
        def fail(message: str):
            raise IndexFolderError(f"{folder}: {message}; rebuild it with `eclip index`")

        try:
            header = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            fail(f"index.json is not valid JSON ({error})")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise IndexFolderError(f"{folder}/index.json is not an eclip product index")
        if header.get("version") != FORMAT_VERSION:
            raise IndexFolderError(f"{folder}: index format version {header.get('version')}, this code reads {FORMAT_VERSION}; rebuild it")
        for key, kind in (("kind", str), ("dim", int), ("params", dict), ("next_id", int)):
            if not isinstance(header.get(key), kind):
                fail(f"index.json has no valid {key!r}")
        if header["kind"] not in FAISS_CLASSES:
            fail(f"index.json names an unknown kind {header['kind']!r}")
        for name, expected in (header.get("files") or {}).items():
            path = folder / name
            size = path.stat().st_size
            if size != expected["bytes"]:
                fail(f"{name} is {size} bytes, index.json says {expected['bytes']} (truncated, or from another index)")
            if verify and _file_digest(path)["sha256"] != expected["sha256"]:
                fail(f"{name} does not match the checksum written at save (from another index, or changed since)")

        try:
            index = faiss.read_index(str(folder / "index.faiss"))
        except RuntimeError as error:
            fail(f"index.faiss is not a readable FAISS index ({str(error).strip().splitlines()[-1]})")
        kind, dim = header["kind"], header["dim"]
        if type(index).__name__ != FAISS_CLASSES[kind]:
            fail(f"index.faiss is a {type(index).__name__}, a {kind!r} index is a {FAISS_CLASSES[kind]}")
        if index.d != dim:
            fail(f"index.faiss has dimension {index.d}, index.json says {dim}")
        ntotal = int(index.ntotal)
        if "faiss_ntotal" in header and ntotal != header["faiss_ntotal"]:
            fail(f"index.faiss holds {ntotal} vectors, index.json says {header['faiss_ntotal']} (from another index?)")

        vectors = _read_parquet(folder / "vectors.parquet", {"id": pa.int64(), "product_id": pa.string(), "image_path": pa.string()}, fail)
        products = _read_parquet(folder / "products.parquet", {"product_id": pa.string(), "metadata": pa.string()}, fail)
        ids = vectors.column("id").to_numpy()
        pids = vectors.column("product_id").to_pylist()
        next_id = header["next_id"]
        if "vectors" in header and len(ids) != header["vectors"]:
            fail(f"vectors.parquet has {len(ids)} rows, index.json says {header['vectors']}")
        if None in pids or (len(ids) and (ids.min() < 0 or ids.max() >= next_id)) or len(np.unique(ids)) != len(ids):
            fail("vectors.parquet has a missing product id, or a vector id that is repeated or out of range")
        # live vectors against FAISS: HNSW keeps removed ones as tombstones (ids are positions);
        # flat (an id map) and IVF-PQ remove for real
        if kind == "hnsw" and ntotal != next_id:
            fail(f"index.faiss holds {ntotal} vectors, an HNSW index of next id {next_id} holds {next_id}")
        if kind != "hnsw" and ntotal != len(ids):
            fail(f"index.faiss holds {ntotal} vectors, vectors.parquet lists {len(ids)} (from another index?)")
        if kind == "flat" and not np.array_equal(np.sort(faiss.vector_to_array(index.id_map)), np.sort(ids)):
            fail("index.faiss holds other vector ids than vectors.parquet (from another index?)")

        product_ids = products.column("product_id").to_pylist()
        known = set(product_ids)
        if len(known) != len(product_ids) or None in known:
            fail("products.parquet repeats a product id or has an empty one")
        orphans = [p for p in dict.fromkeys(pids) if p not in known]
        if orphans:
            fail(f"products.parquet has no row for product {orphans[0]!r}" + (f" and {len(orphans) - 1} more" if len(orphans) > 1 else ""))
        if "products" in header and len(product_ids) != header["products"]:
            fail(f"products.parquet has {len(product_ids)} rows, index.json says {header['products']}")
        if len(known) != len(set(pids)):
            fail(f"{len(known) - len(set(pids))} product(s) in products.parquet have no vector in vectors.parquet")

        self = cls(index, kind, dim, header["params"], header.get("info"))
        if kind == "ivfpq":
            index.nprobe = self.params["nprobe"]
        self._next_id = next_id
        self._grow(next_id)
        self._vec_pid[ids] = np.array(pids, dtype=object)
        self._vec_path[ids] = np.array(vectors.column("image_path").to_pylist(), dtype=object)
        for pid, vid in zip(pids, ids.tolist()):
            self._product_vecs.setdefault(pid, []).append(vid)
        for row, (pid, meta) in enumerate(zip(product_ids, products.column("metadata").to_pylist())):
            try:
                value = json.loads(meta)
            except (TypeError, ValueError):
                value = None
            if not isinstance(value, dict):
                fail(f"products.parquet row {row} (product {pid!r}): metadata is not a JSON object")
            self._products[pid] = value
        self._live_vectors = len(ids)
        # the facet columns are derived from the metadata, not stored
        self._facets.grow(self._next_id)
        self._facets.set_products([(self._product_vecs[pid], meta) for pid, meta in self._products.items()])
        return self

    def __repr__(self) -> str:
        return f"ProductIndex(kind={self.kind!r}, dim={self.dim}, products={len(self)}, vectors={self.num_vectors})"
