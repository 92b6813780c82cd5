"""Filtered search, facet counts and the lexical (BM25) side of the product index: results equal
brute force over the selected products, updates and save/load keep filters and BM25 in step,
bad filters fail with clear errors, and rank fusion does what it says."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("bm25s")

import eclip_app.search.index as index_module  # noqa: E402
from eclip_app.search.filters import FilterError, parse_filters  # noqa: E402
from eclip_app.search.index import ProductIndex  # noqa: E402
from eclip_app.search.lexical import reciprocal_rank_fusion  # noqa: E402

from .test_search import clustered  # noqa: E402

COLOURS = ["Navy Blue", "Red", "Black", "White"]
KINDS = ["Tshirts", "Sandals", "Shoes", "Watches", "Jeans"]


def _catalog(n_products: int, images: int = 2, dim: int = 24, seed: int = 0):
    """Products with facets whose selectivity the test controls: `rare` marks 1 product in 100."""
    x = clustered(n_products * images, dim, 12, seed)
    pids, meta = [], []
    for i in range(len(x)):
        p = i // images
        pids.append(f"p{p}")
        meta.append({"title": f"Brand{p % 7} {COLOURS[p % 4]} {KINDS[p % 5]}", "category": KINDS[p % 5],
                     "attributes": {"gender": "Men" if p % 2 else "Women", "baseColour": COLOURS[p % 4],
                                    "rare": "yes" if p % 100 == 0 else "no"},
                     "price": float(p % 50), "image_path": f"/img/{i}.png"})
    return x, pids, meta


def _meets(meta: dict, filters: dict) -> bool:
    values = {**meta.get("attributes", {}), **meta}
    for key, want in filters.items():
        if isinstance(want, dict):
            if not want.get("gte", -np.inf) <= values[key] <= want.get("lte", np.inf):
                return False
        elif str(values[key]).casefold() not in {str(w).casefold() for w in (want if isinstance(want, list) else [want])}:
            return False
    return True


def _brute_force(x, pids, meta, query, k, filters):
    """Exact filtered search: the best photo per product among products meeting the filters."""
    scores = x @ query
    best: dict[str, float] = {}
    for s, pid, m in zip(scores, pids, meta):
        if _meets(m, filters):
            best[pid] = max(best.get(pid, -np.inf), float(s))
    return sorted(best.items(), key=lambda item: -item[1])[:k]


FILTERS = [
    {"gender": "Men"},  # 50 %
    {"category": "tshirts", "gender": "women"},  # 10 %, case-insensitive
    {"baseColour": ["Red", "Black"], "price": {"gte": 10, "lte": 19}},  # any of, and a range
    {"rare": "yes"},  # 1 %: the exact path
]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "hnsw-selector", "ivfpq-selector"])
def test_filtered_search_equals_exact_filtered_search(kind, monkeypatch):
    x, pids, meta = _catalog(1000)
    scanned = kind == "hnsw"  # 1,000 vectors: every filter selects fewer than EXACT_FILTER_VECTORS
    if kind.endswith("-selector"):  # every filter through the index's own search with an id selector
        monkeypatch.setattr(index_module, "EXACT_FILTER_VECTORS", 0)
        kind = kind.split("-")[0]
    index = ProductIndex.build(x, pids, meta, kind=kind)
    queries = clustered(12, 24, 12, seed=5)
    for filters in FILTERS:
        for q, got in zip(queries, index.search(queries, 10, filters=filters)):
            expected = _brute_force(x, pids, meta, q, 10, filters)
            assert all(_meets(index.metadata(p), filters) for p, _ in got), filters
            assert len(got) == len(expected) == min(10, sum(_meets(index.metadata(p), filters) for p in index.product_ids()))
            if kind == "flat" or scanned:  # HNSW's scan of the selected vectors is exact too
                assert [p for p, _ in got] == [p for p, _ in expected]
                assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-5)
            elif kind == "hnsw":  # exact below the threshold, near-exact above
                overlap = len({p for p, _ in got} & {p for p, _ in expected})
                assert overlap >= 9, (filters, overlap)


def test_filter_expressions_and_errors():
    conditions = {c.key: c for c in parse_filters(["gender=Men", "gender=Women", "price>=5", "price<=20", "price>=7"])}
    assert conditions["gender"].values == {"men", "women"}
    assert (conditions["price"].low, conditions["price"].high) == (7.0, 20.0)
    assert parse_filters(["price<=20"]) == parse_filters({"price": {"lte": 20}})
    for bad, message in [(["gender"], "bad filter"), (["price>=cheap"], "needs a number"),
                         ({"price": {"above": 3}}, "gte"), ({"gender": {}}, "gte"), (3, "must be a list")]:
        with pytest.raises(FilterError, match=message):
            parse_filters(bad)
    x, pids, meta = _catalog(50)
    index = ProductIndex.build(x, pids, meta, kind="flat")
    with pytest.raises(FilterError, match="no product has the facet 'brand'; facets: baseColour, category"):
        index.search(x[:1], 5, filters={"brand": "Nike"})
    assert index.search(x[:1], 5, filters={"gender": "Unisex"}) == [[]]  # a known key, no such value


def test_facet_counts_count_products_and_leave_a_facets_own_filter_out():
    x, pids, meta = _catalog(200, images=3)
    index = ProductIndex.build(x, pids, meta, kind="flat")
    counts = index.facet_counts()
    assert counts["gender"] == {"Women": 100, "Men": 100}  # products, not their 3 photos
    assert counts["category"] == {k: 40 for k in KINDS}
    assert "price" in counts and "title" not in counts
    filtered = index.facet_counts({"gender": "Men", "category": "Shoes"})
    # gender's counts ignore the gender filter (the other value stays choosable), not category's
    assert filtered["gender"] == {"Women": 20, "Men": 20}
    men = [p for p in index.product_ids() if index.metadata(p)["attributes"]["gender"] == "Men"]
    assert filtered["category"] == {k: sum(index.metadata(p)["category"] == k for p in men) for k in KINDS}
    assert sum(filtered["baseColour"].values()) == 20


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filters_and_bm25_follow_updates_and_save_load(kind, tmp_path):
    x, pids, meta = _catalog(300)
    index = ProductIndex.build(x, pids, meta, kind=kind)
    both = {f"p{p}" for p in range(300) if p % 7 == 3 and p % 5 == 1}  # Brand3 and Sandals
    assert {p for p, _ in index.search_lexical("brand3 sandals", 50)[: len(both)]} == both
    # removal: gone from filtered, facet and lexical results at once
    index.remove(["p31"])
    assert {p for p, _ in index.search_lexical("brand3 sandals", 50)[: len(both) - 1]} == both - {"p31"}
    assert index.facet_counts()["category"]["Sandals"] == 59
    # a new product: found by a word only it has, and by its facets
    index.add(x[:1], ["fresh"], [{"title": "Zephyrine Silk Scarf", "category": "Scarves", "attributes": {"gender": "Women"}}])
    assert index.search_lexical("zephyrine", 5) == [("fresh", pytest.approx(index.search_lexical("zephyrine", 5)[0][1]))]
    assert [p for p, _ in index.search(x[:1], 5, filters={"category": "scarves"})[0]] == ["fresh"]
    # a replaced product's old facets are gone
    index.add(x[2:3], ["p1"], [{"title": "renamed", "category": "Scarves"}])
    assert {p for p, _ in index.search(x[:3], 5, filters={"category": "Scarves"})[0]} == {"fresh", "p1"}
    assert "p1" not in {p for p, _ in index.search(x[:3], 300, filters={"category": "Sandals"})[0]}
    index.save(tmp_path / "index")
    loaded = ProductIndex.load(tmp_path / "index")
    filters = {"gender": "Women", "price": {"lte": 9}}
    assert loaded.search(x[:8], 10, filters=filters) == index.search(x[:8], 10, filters=filters)
    assert loaded.facet_counts(filters) == index.facet_counts(filters)
    assert loaded.search_lexical("red tshirts", 10, filters) == index.search_lexical("red tshirts", 10, filters)
    assert all(index.metadata(p)["attributes"]["gender"] == "Women" for p, _ in loaded.search_lexical("red tshirts", 10, filters))
    assert not [f.name for f in (tmp_path / "index").iterdir() if f.suffix == ".pkl"]
    if kind == "hnsw":  # a compaction renumbers vectors: filters and BM25 still point right
        index.remove([f"p{i}" for i in range(2, 250)])
        assert index.num_tombstones == 0
        assert {p for p, _ in index.search(x[:1], 10, filters={"category": "Scarves"})[0]} == {"fresh", "p1"}
        assert index.search_lexical("zephyrine", 5)[0][0] == "fresh"
        assert index.facet_counts()["category"]["Scarves"] == 2


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=3, constant=60)
    assert [p for p, _ in fused] == ["a", "c", "b"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert reciprocal_rank_fusion([[], []], k=5) == []
    weighted = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=4, weights=[0.2, 1.0])
    assert [p for p, _ in weighted] == ["c", "a", "d", "b"]  # the second ranking leads
    assert weighted[0][1] == pytest.approx(0.2 / 63 + 1 / 61)
    with pytest.raises(ValueError, match="2 weights for 3 rankings"):
        reciprocal_rank_fusion([["a"], ["b"], ["c"]], k=1, weights=[1.0, 1.0])
