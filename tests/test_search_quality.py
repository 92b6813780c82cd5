"""The search-quality experiment (experiments/search_quality): shopper-style queries and graded
relevance from attributes, the metrics on hand-worked rankings, the fusions, and an end-to-end
run (text and image queries) on a tiny synthetic Myntra-like catalog (styles.csv + images) with
an untrained tiny model."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("bm25s")

from eclip.data import Product  # noqa: E402
from experiments.search_quality.search_quality import (  # noqa: E402
    FUSIONS,
    Query,
    build_queries,
    convex_fusion,
    main,
    metrics,
    relevance,
    weighted_rrf,
)

ROWS = [  # id, gender, subCategory, baseColour, usage, title
    (1, "Men", "Topwear", "Navy Blue", "Casual", "Nike Men Town Navy Blue Tshirts"),
    (2, "Men", "Topwear", "Red", "Sports", "Nike Men Dri Fit Red Tshirts"),
    (3, "Women", "Shoes", "White", "Sports", "Puma Women Velocity Running White Shoes"),
    (4, "Women", "Sandal", "Brown", "Casual", "Catwalk Women Strappy Brown Sandals"),
    (5, "Men", "Shoes", "Black", "Casual", "Puma Men Roma Black Shoes"),
    (6, "Women", "Topwear", "Navy Blue", "Casual", "Vero Moda Women Navy Blue Tshirts"),
]


def _products() -> list[Product]:
    return [Product(str(i), title, [], category=cat, attributes={"baseColour": colour, "gender": gender, "usage": usage})
            for i, gender, cat, colour, usage, title in ROWS]


def test_queries_are_shopper_phrases_with_graded_relevance():
    products = _products()
    queries = build_queries(products, per_kind=50, seed=0)
    kinds = {q.kind for q in queries}
    assert kinds == {"attributes", "brand", "partial", "synonyms"}
    titles = {p.title.lower() for p in products}
    assert all(q.text not in titles for q in queries)
    for q in queries:
        assert q.grades[q.source] == 2  # the product a query was written from fully matches it
    by_text = {q.text: q for q in queries}
    navy = by_text["navy blue tshirts for men"]
    assert navy.grades == {"1": 2, "2": 1, "5": 1, "6": 1}  # 2 and 5: men; 6: navy blue tshirts, for women
    assert navy.filters == {"gender": "men"}
    tee = by_text["navy blue tee for guys"]  # a word no title has, graded as "navy blue tshirts for men"
    assert tee.kind == "synonyms" and tee.grades == navy.grades and not any("tee" in t.split() for t in titles)
    puma = by_text["puma shoes"]
    assert {pid: g for pid, g in puma.grades.items()} == {"3": 2, "5": 2}  # puma: 3 and 5; shoes: only puma's here
    partial = Query("partial", "town navy", {"brand": "nike", "type": "tshirt"}, {}, "1", phrase="town navy")
    assert [relevance(partial, p) for p in products] == [2, 1, 0, 0, 0, 1]


def test_metrics_on_hand_worked_rankings():
    grades = {"a": 2, "b": 1, "c": 2}
    perfect = metrics(["a", "c", "b", "x"], grades)
    assert perfect == {"ndcg@10": pytest.approx(1.0), "r@10": 1.0, "mrr": 1.0}
    got = metrics(["x", "b", "a"], grades)
    dcg = 1 / math.log2(3) + 3 / math.log2(4)
    idcg = 3 + 3 / math.log2(3) + 1 / math.log2(4)
    assert got == {"ndcg@10": pytest.approx(dcg / idcg), "r@10": 0.5, "mrr": pytest.approx(1 / 3)}
    assert metrics(["x"], grades) == {"ndcg@10": 0.0, "r@10": 0.0, "mrr": 0.0}


def test_fusions_move_between_the_two_rankings_with_their_weight():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    lexical = [("c", 12.0), ("a", 5.0), ("d", 1.0)]
    assert weighted_rrf(dense, lexical, 1.0) == ["a", "c", "b", "d"]  # in both lists first, a's ranks (1, 2) beat c's (3, 1)
    assert weighted_rrf(dense, lexical, 100.0) == ["a", "b", "c", "d"]  # the dense order
    assert weighted_rrf(dense, lexical, 0.01) == ["c", "a", "d", "b"]  # the lexical order
    assert convex_fusion(dense, lexical, 1.0)[:3] == ["a", "b", "c"]
    assert convex_fusion(dense, lexical, 0.0)[:3] == ["c", "a", "b"]  # b and d tie at 0: by id
    assert convex_fusion(dense, lexical, 0.5) == ["a", "c", "b", "d"]  # a: 0.5 + 0.5 * 4/11, c: 0.5


def test_end_to_end_on_a_tiny_catalog(tmp_path, capsys):
    data = tmp_path / "myntra"
    (data / "images").mkdir(parents=True)
    lines = ["id,gender,masterCategory,subCategory,baseColour,season,usage,productDisplayName"]
    for copy in range(4):  # 24 products: each row four times with its own id
        for i, gender, cat, colour, usage, title in ROWS:
            pid = 100 * copy + i
            lines.append(f"{pid},{gender},Apparel,{cat},{colour},Summer,{usage},{title}")
            Image.new("RGB", (32, 32), (40 * i, 20 * copy, 90)).save(data / "images" / f"{pid}.jpg")
    (data / "styles.csv").write_text("\n".join(lines) + "\n")
    scenes = tmp_path / "scenes"  # a "scene" per product: its photo on a wider canvas, paths relative to the catalog
    (scenes / "images").mkdir(parents=True)
    records = []
    for line in lines[1:]:
        pid, title = line.split(",")[0], line.split(",")[-1]
        canvas = Image.new("RGB", (64, 64), (200, 200, 200))
        canvas.paste(Image.open(data / "images" / f"{pid}.jpg"), (8, 24))
        canvas.save(scenes / "images" / f"{pid}.jpg")
        records.append(json.dumps({"product_id": pid, "title": title, "images": [{"path": f"images/{pid}.jpg", "box": [8, 24, 40, 56]}]}))
    (scenes / "catalog.jsonl").write_text("\n".join(records) + "\n")
    out = tmp_path / "results.json"
    assert main(["--quick", "--data", str(data), "--work", str(tmp_path / "work"), "--out", str(out), "--train-products", "4",
                 "--heldout-products", "16", "--validation-products", "0", "--queries-per-kind", "4", "--image-size", "32",
                 "--scenes", f"tiny={scenes / 'catalog.jsonl'}", "--scenes-per-set", "10"]) == 0
    results = json.loads(out.read_text())
    assert results["heldout_products"] == 16 and set(results["results"]) == {"lexical (BM25)", "dense untrained tiny", "hybrid untrained tiny"}
    for arm in results["results"].values():
        for setting in ("none", "filtered"):
            scores = arm[setting]["all"]
            assert 0 <= scores["ndcg@10"] <= 1 and 0 <= scores["mrr"] <= 1 and scores["queries"] == results["queries"]
    # brand and type words are in every relevant title: BM25 ranks a fully relevant product first
    assert results["results"]["lexical (BM25)"]["none"]["brand"]["mrr"] == 1.0
    fusion = results["fusion"]["untrained tiny"]
    assert set(fusion) == {f"rrf w={w:g}" for w in FUSIONS["rrf"]} | {f"convex a={a:g}" for a in FUSIONS["convex"]}
    # the library's hybrid is RRF at its default dense weight
    assert fusion[f"rrf w={results['hybrid_dense_weight']:g}"] == results["results"]["hybrid untrained tiny"]
    images = results["images"]["tiny"]["untrained tiny"]  # 10 of the 16 searched products' scenes
    assert set(images) == {"image", "image tiles=2", "image + hint w=0.25", "image + hint w=0.25 tiles=2",
                           "image + hint w=0.5", "image + hint w=0.5 tiles=2"}
    for m in images.values():
        assert m["queries"] == 10 and 0 <= m["r@10"] <= 1 and m["mrr"] <= m["r@10"]  # one grade-2 product: MRR <= hit@10
    printed = capsys.readouterr().out
    assert "| lexical (BM25) |" in printed and "image queries: tiny scenes" in printed
