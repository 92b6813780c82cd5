"""Search quality on shopper-style queries over held-out Myntra products: nDCG@10, R@10 and MRR
of dense (ECLIP, the CLIP baseline), lexical (BM25) and hybrid (reciprocal rank fusion)
ranking, without and with a facet filter; the hybrid's fusion against weighted variants; and
image queries (a composed scene showing the product, with and without a text hint).

    python experiments/search_quality/search_quality.py --model runs/sp/eclip_320/model --baseline runs/sp/clip_320/model \
        --scenes small=runs/sp/heldout_small_scenes/catalog.jsonl --scenes large=runs/sp/heldout_large_scenes/catalog.jsonl
    python experiments/search_quality/search_quality.py --quick     # untrained tiny model: a smoke test

1. The catalog and the split are real_catalog's (`myntra_catalog`, `split_by_product`, same
   seed and sizes as experiments/small_products): the held-out products were in no training
   run, and they are both the searched catalog and the source of the queries (`--split
   validation` searches the validation products instead, for a run that keeps its held-out split
   unread).
2. Queries (`build_queries`), each from one held-out product's attributes, written the way
   shoppers type, never the title itself:
   - `attributes`: "{colour} {type} for {gender}" and "{gender} {usage} {type}" ("navy blue
     tshirts for men", "women casual sandals");
   - `brand`: "{brand} {type}" ("puma casual shoes"), brand = the title's first word (the
     catalog has no brand field);
   - `partial`: 2-3 consecutive words from the middle of a title ("jace sko white");
   - `synonyms`: "{colour} {shopper word} for {guys|ladies}" ("navy blue tee for guys"), the
     type in a word the catalog does not use (`SHOPPER_WORDS`): the case the three above,
     all in the catalog's own words, leave out.
   `type` is the title's last word (Myntra titles end with the article type: Tshirts, Skirts,
   Shoes), since styles.csv's subCategory is coarser (Topwear, Shoes).
3. Graded relevance (`relevance`): a query stands for a set of attribute conditions; a product
   meeting all of them is 2, some of them 1, none 0. Types compare normalised (`product_type`:
   "T-shirt" = "Tshirts"). Partial titles: 2 if the title contains
   the words, 1 if the product shares the source's brand or type.
4. Metrics per query, averaged: nDCG@10 (graded gains 2^rel - 1, the ideal from every held-out
   product), R@10 = fully relevant products in the top 10 / min(10, fully relevant products),
   MRR = 1 / rank of the first fully relevant product (0 if none in the top 10).
5. With filters: the same query with the facet a shopper would click (gender for attribute
   queries, subCategory for the others) as a `ProductIndex` filter.
6. Fusion (`FUSIONS`): from each query's dense and BM25 top HYBRID_DEPTH, the library's hybrid
   (reciprocal rank fusion) against RRF with the dense term weighted by w, and a convex mix
   a * dense + (1 - a) * BM25 of min-max normalised scores. The library's hybrid at
   dense_weight 1 is checked to equal rrf w=1; the tables' `hybrid` arms are the library's
   default (`DENSE_WEIGHT`).
7. Image queries (`--scenes NAME=CATALOG`, composed scenes of the searched products, e.g.
   small_products' held-out scenes): the scene is the query, its product grade 2, products of
   its article type grade 1. Text-free (the whole scene, and tiled 2 x 2 with the whole scene
   as tile 0) and with the hint "the {type}" at each `--hint-weights`: the query vectors of
   `Searcher.embed_image` / `embed_image_text` (`eclip.tiling`, one image-tower pass per
   scene, checked against Searcher's on the first), ranked by `Searcher.search_vector`.

Writes `--out` (JSON) and prints a Markdown table per query kind.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `experiments.` imports from any cwd

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eclip.data import Product, load_catalog  # noqa: E402
from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.model import ECLIP  # noqa: E402
from eclip.presets import model_preset  # noqa: E402
from eclip.tiling import tiled_hinted_vectors, tiled_product_vectors  # noqa: E402
from eclip_app.search.index import ProductIndex  # noqa: E402
from eclip_app.search.lexical import reciprocal_rank_fusion  # noqa: E402
from eclip_app.search.searcher import DENSE_WEIGHT, HYBRID_DEPTH, Searcher  # noqa: E402
from experiments.real_catalog.real_catalog import (  # noqa: E402
    DEFAULT_DATA,
    myntra_catalog,
    shrink_for_quick,
    split_by_product,
)

logger = logging.getLogger("eclip.search_quality")
K = 10


# ----------------------------------------------------------------------------- queries


def _words(title: str) -> list[str]:
    return title.split()


def type_word(product: Product) -> str:
    """The article type as the title writes it: its last word (Myntra titles end with it)."""
    words = _words(product.title)
    return words[-1].lower() if words else ""


@functools.cache
def _stem(word: str) -> str:
    import Stemmer  # PyStemmer, which the lexical index already needs

    return Stemmer.Stemmer("english").stemWord(word.replace("-", ""))


def product_type(product: Product) -> str:
    """The article type, normalised: "T-shirt", "Tshirts" and "tshirt" are one type (hyphens
    dropped, Snowball stem), so a grade does not hinge on how a title spells it."""
    return _stem(type_word(product))


# shopper words the catalog's titles and attributes do not use (module doc, 2), by type stem
SHOPPER_WORDS = {"tshirt": "tee", "shirt": "button-down", "shoe": "sneakers", "top": "blouse", "wallet": "billfold",
                 "jean": "denims", "flat": "ballerinas", "heel": "stilettos", "kurta": "ethnic tunic", "sunglass": "shades",
                 "handbag": "purse", "trouser": "slacks", "sweatshirt": "pullover", "flop": "chappals", "backpack": "rucksack",
                 "watch": "wristwatch", "sweater": "jumper", "short": "bermudas", "jacket": "windcheater"}
SHOPPER_GENDER = {"men": "guys", "women": "ladies"}


def brand(product: Product) -> str:
    return _words(product.title)[0].lower() if product.title.strip() else ""


def fields(product: Product) -> dict[str, str]:
    """The facts a query can name: attributes, category, type and brand, lower-cased."""
    out = {k.lower(): str(v).lower() for k, v in product.attributes.items() if v}
    if product.category:
        out["category"] = product.category.lower()
    out["type"], out["brand"] = product_type(product), brand(product)
    return out


@dataclass
class Query:
    kind: str  # attributes | brand | partial
    text: str
    conditions: dict[str, str]  # field -> value a relevant product has (module doc, 3)
    filters: dict[str, str]  # the facet a shopper would click
    source: str  # the product it was written from
    phrase: str | None = None  # partial titles: the words a title must contain for grade 2
    grades: dict[str, int] = field(default_factory=dict)


def relevance(query: Query, product: Product) -> int:
    f = fields(product)
    if query.phrase is not None:
        if query.phrase in " ".join(_words(product.title)).lower():
            return 2
        return 1 if any(f.get(k) == v for k, v in query.conditions.items()) else 0
    met = sum(f.get(k) == v for k, v in query.conditions.items())
    return 2 if met == len(query.conditions) else (1 if met else 0)


def build_queries(products: list[Product], per_kind: int, seed: int) -> list[Query]:
    """Up to `per_kind` distinct queries of each kind from the products (module doc, 2), with
    every product's grade for each."""
    rng = random.Random(f"search-quality-{seed}")
    order = list(products)
    rng.shuffle(order)
    queries: dict[str, dict[str, Query]] = {"attributes": {}, "brand": {}, "partial": {}, "synonyms": {}}
    for p in order:
        f = fields(p)
        colour, gender, usage, kind = f.get("basecolour"), f.get("gender"), f.get("usage"), f.get("type")
        if not kind:
            continue
        word = type_word(p)
        candidates = []
        if colour and gender:
            candidates.append(Query("attributes", f"{colour} {word} for {gender}",
                                    {"basecolour": colour, "type": kind, "gender": gender}, {"gender": gender}, p.product_id))
        if gender and usage:
            candidates.append(Query("attributes", f"{gender} {usage} {word}",
                                    {"gender": gender, "usage": usage, "type": kind}, {"gender": gender}, p.product_id))
        if f["brand"] and f["brand"] != word:
            candidates.append(Query("brand", f"{f['brand']} {word}", {"brand": f["brand"], "type": kind},
                                    {"category": p.category} if p.category else {}, p.product_id))
        words = _words(p.title)
        if len(words) >= 5:
            n = rng.choice([2, 3])
            start = rng.randrange(1, len(words) - n)  # not the brand alone, not the type alone
            phrase = " ".join(words[start : start + n]).lower()
            candidates.append(Query("partial", phrase, {"brand": f["brand"], "type": kind},
                                    {"category": p.category} if p.category else {}, p.product_id, phrase=phrase))
        if colour and kind in SHOPPER_WORDS and gender in SHOPPER_GENDER:
            candidates.append(Query("synonyms", f"{colour} {SHOPPER_WORDS[kind]} for {SHOPPER_GENDER[gender]}",
                                    {"basecolour": colour, "type": kind, "gender": gender}, {"gender": gender}, p.product_id))
        for q in candidates:
            bucket = queries[q.kind]
            if len(bucket) < per_kind and q.text not in bucket:
                bucket[q.text] = q
    out = [q for bucket in queries.values() for q in bucket.values()]
    for q in out:
        q.grades = {p.product_id: g for p in products if (g := relevance(q, p))}
    return out


# ----------------------------------------------------------------------------- metrics


def metrics(ranked: list[str], grades: dict[str, int], k: int = K) -> dict[str, float]:
    """nDCG@k (gains 2^g - 1), R@k over grade-2 products (capped at k), MRR of the first grade 2."""
    gains = [2 ** grades.get(pid, 0) - 1 for pid in ranked[:k]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((2**g - 1 for g in grades.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    full = {pid for pid, g in grades.items() if g == 2}
    hits = [i for i, pid in enumerate(ranked[:k]) if pid in full]
    return {"ndcg@10": dcg / idcg if idcg else 0.0,
            "r@10": len(hits) / min(k, len(full)) if full else 0.0,
            "mrr": 1.0 / (hits[0] + 1) if hits else 0.0}


def evaluate_arm(rank, queries: list[Query], filtered: bool) -> dict[str, dict[str, float]]:
    """rank(query text, filters) -> product ids; mean metrics per query kind and overall."""
    per_kind: dict[str, list[dict[str, float]]] = {}
    for q in queries:
        m = metrics(rank(q.text, q.filters if filtered else None), q.grades)
        per_kind.setdefault(q.kind, []).append(m)
        per_kind.setdefault("all", []).append(m)
    return {kind: {name: float(np.mean([m[name] for m in ms])) for name in ms[0]} | {"queries": len(ms)}
            for kind, ms in per_kind.items()}


# ----------------------------------------------------------------------------- fusion

FUSIONS: dict[str, list[float]] = {"rrf": [0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0], "convex": [0.02, 0.05, 0.1, 0.25, 0.5, 0.75]}


def weighted_rrf(dense: list[tuple[str, float]], lexical: list[tuple[str, float]], dense_weight: float, k: int = K) -> list[str]:
    """score = w / (RRF_K + dense rank) + 1 / (RRF_K + BM25 rank): the library's hybrid at dense_weight w."""
    rankings = [[pid for pid, _ in dense], [pid for pid, _ in lexical]]
    return [pid for pid, _ in reciprocal_rank_fusion(rankings, k, weights=[dense_weight, 1.0])]


def _minmax(ranking: list[tuple[str, float]]) -> dict[str, float]:
    if not ranking:
        return {}
    scores = np.array([s for _, s in ranking])
    span = scores.max() - scores.min()
    return {pid: float((s - scores.min()) / span) if span > 0 else 1.0 for pid, s in ranking}


def convex_fusion(dense: list[tuple[str, float]], lexical: list[tuple[str, float]], alpha: float, k: int = K) -> list[str]:
    """a * dense + (1 - a) * BM25, each list's scores min-max normalised; absent from a list = 0."""
    d, lex = _minmax(dense), _minmax(lexical)
    scores = {pid: alpha * d.get(pid, 0.0) + (1 - alpha) * lex.get(pid, 0.0) for pid in d.keys() | lex.keys()}
    return [pid for pid, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]]


def fusion_arms() -> dict[str, Callable]:
    """name -> fuse(dense, lexical) -> top K ids."""
    arms: dict[str, Callable] = {}
    for w in FUSIONS["rrf"]:
        arms[f"rrf w={w:g}"] = functools.partial(weighted_rrf, dense_weight=w)
    for a in FUSIONS["convex"]:
        arms[f"convex a={a:g}"] = functools.partial(convex_fusion, alpha=a)
    return arms


def _filter_key(filters: dict | None) -> tuple:
    return tuple(sorted((filters or {}).items()))


def evaluate_fusions(searcher: Searcher, queries: list[Query], lexical_lists: dict) -> dict[str, dict]:
    """Every fusion arm on each query's dense and BM25 top HYBRID_DEPTH, without and with the
    filter; `lexical_lists` caches BM25 across models. Checks that rrf w=1 is the library's hybrid."""
    arms = fusion_arms()
    per_setting: dict[str, dict[str, dict]] = {}
    mismatches = 0
    for setting, filtered in (("none", False), ("filtered", True)):
        lists = {}  # (text, filters) -> (dense, BM25): one text can be two kinds' query, with different filters
        for q in queries:
            filters = q.filters if filtered else None
            key = (q.text, _filter_key(filters))
            if key not in lexical_lists:
                lexical_lists[key] = [(r.product_id, r.score) for r in searcher.search_text(q.text, HYBRID_DEPTH, filters, mode="lexical")]
            dense = [(r.product_id, r.score) for r in searcher.search_text(q.text, HYBRID_DEPTH, filters, mode="dense")]
            lists[key] = (dense, lexical_lists[key])
            library = [r.product_id for r in searcher.search_text(q.text, K, filters, mode="hybrid", dense_weight=1.0)]
            mismatches += library != weighted_rrf(dense, lexical_lists[key], 1.0)
        for name, fuse in arms.items():
            def rank(text, filters, fuse=fuse, lists=lists):
                return fuse(*lists[(text, _filter_key(filters))])

            per_setting.setdefault(name, {})[setting] = evaluate_arm(rank, queries, filtered)
    if mismatches:
        raise AssertionError(f"rrf w=1 differs from the library's reciprocal rank fusion on {mismatches} queries")
    return per_setting


# ----------------------------------------------------------------------------- image queries


def scene_queries(catalog: Path, searched: list[Product], limit: int, seed: int) -> list[tuple[Product, dict[str, int]]]:
    """(scene, grades) for each scene whose product is searched (at most `limit`, a seeded
    sample): the product 2, the other products of its article type 1."""
    scenes, _ = load_catalog(catalog, check_images=False)
    by_id = {p.product_id: p for p in searched}
    scenes = [s for s in scenes if s.product_id in by_id and s.images]
    if limit and len(scenes) > limit:
        scenes = sorted(random.Random(f"scenes-{seed}").sample(scenes, limit), key=lambda s: s.product_id)
    out = []
    for scene in scenes:
        kind = product_type(by_id[scene.product_id])
        grades = {p.product_id: 1 for p in searched if product_type(p) == kind} | {scene.product_id: 2}
        out.append((scene, grades))
    return out


def image_query_vectors(searcher: Searcher, image, hint: str, weights: list[float]) -> dict[str, np.ndarray]:
    """The query vectors of `Searcher.embed_image` and `embed_image_text`, whole scene and tiles=2,
    from one image-tower pass (tile 0 is the whole scene)."""
    model = searcher.model
    readout = "global" if searcher.field == "global" else None
    with torch.inference_mode():
        encoding = model.encode_image(searcher._tile_pixels(image, 2))
        plain = tiled_product_vectors(model, encoding, 1, readout)[0].float().cpu().numpy()
        text = model.encode_text([hint])
        out = {"image": plain[0], "image tiles=2": plain}
        for w in weights:
            hinted = tiled_hinted_vectors(model, encoding, text, w, readout)[0].float().cpu().numpy()
            out[f"image + hint w={w:g}"], out[f"image + hint w={w:g} tiles=2"] = hinted[0], hinted
    return out


def evaluate_scenes(searcher: Searcher, scenes: list[tuple[Product, dict[str, int]]], weights: list[float],
                    hint_template: str) -> dict[str, dict[str, float]]:
    """Mean nDCG@10, R@10 (= hit@10: one grade-2 product) and MRR per query arm."""
    from PIL import Image

    per_arm: dict[str, list[dict[str, float]]] = {}
    for i, (scene, grades) in enumerate(scenes):
        hint = hint_template.format(type_word(scene))
        with Image.open(scene.images[0].path) as photo:
            image = photo.convert("RGB")
        vectors = image_query_vectors(searcher, image, hint, weights)
        if i == 0:  # the shared pass gives Searcher's own query vectors
            for name, ref in (("image", searcher.embed_image(image)), ("image tiles=2", searcher.embed_image(image, tiles=2)),
                              (f"image + hint w={weights[0]:g} tiles=2", searcher.embed_image_text(image, hint, weights[0], tiles=2))):
                if not np.allclose(vectors[name], ref, atol=1e-4):
                    raise AssertionError(f"{name}: the shared pass differs from Searcher's query vector")
        for name, vector in vectors.items():
            ranked = [r.product_id for r in searcher.search_vector(vector, K)]
            per_arm.setdefault(name, []).append(metrics(ranked, grades))
    return {name: {m: float(np.mean([r[m] for r in rows])) for m in rows[0]} | {"queries": len(rows)} for name, rows in per_arm.items()}


# ----------------------------------------------------------------------------- models and index


def index_products(model: ECLIP, products: list[Product], batch: int = 64) -> ProductIndex:
    """One product embedding per product photo, metadata as `eclip index` writes it."""
    vectors, pids, meta = [], [], []
    rows = [(p, im.path) for p in products for im in p.images]
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pixels = normalize(torch.stack([to_uint8_tensor(load_rgb(path), model.image_size) for _, path in chunk]))
        with torch.inference_mode():
            vectors.append(model.product_embedding(pixels).float().numpy())
        for p, path in chunk:
            pids.append(p.product_id)
            meta.append({"title": p.title, "category": p.category, "attributes": p.attributes, "image_path": path})
    return ProductIndex.build(np.concatenate(vectors), pids, meta, kind="flat")


def cached_index(model: ECLIP, products: list[Product], folder: Path, source: str) -> ProductIndex:
    """`index_products`, saved to `folder` and reused by a later run of the same model on the same products."""
    key = {"model": source, "products": sorted(p.product_id for p in products)}
    if (folder / "index.json").is_file():
        index = ProductIndex.load(folder)
        if index.info.get("search_quality") == key:
            logger.info("reusing the index in %s", folder)
            return index
    index = index_products(model, products)
    index.info["search_quality"] = key
    index.save(folder)
    return index


def untrained(preset: str, image_size: int, seed: int) -> ECLIP:
    config = model_preset(preset, objective="clip")
    config.vision.image_size = image_size
    torch.manual_seed(seed)
    return ECLIP(config).eval()


def table(results: dict, kinds: list[str]) -> str:
    lines = []
    for kind in kinds:
        lines += [f"\n**{kind}** ({next(iter(results.values()))['none'][kind]['queries']} queries)\n",
                  "| arm | nDCG@10 | R@10 | MRR | nDCG@10 filtered | R@10 filtered | MRR filtered |", "|---|---|---|---|---|---|---|"]
        for arm, r in results.items():
            a, b = r["none"][kind], r["filtered"][kind]
            lines.append(f"| {arm} | {a['ndcg@10']:.3f} | {a['r@10']:.3f} | {a['mrr']:.3f} | "
                         f"{b['ndcg@10']:.3f} | {b['r@10']:.3f} | {b['mrr']:.3f} |")
    return "\n".join(lines)


def fusion_table(fusion: dict[str, dict], kinds: list[str]) -> str:
    """nDCG@10 of every fusion arm per model, per query kind, without | with the filter."""
    head = " | ".join(kinds)
    lines = ["\n**fusion** (nDCG@10, unfiltered / filtered)\n", f"| dense arm | fusion | {head} |", "|---" * (len(kinds) + 2) + "|"]
    for model, arms in fusion.items():
        for arm, r in arms.items():
            cells = " | ".join(f"{r['none'][k]['ndcg@10']:.3f} / {r['filtered'][k]['ndcg@10']:.3f}" for k in kinds)
            lines.append(f"| {model} | {arm} | {cells} |")
    return "\n".join(lines)


def image_table(images: dict[str, dict[str, dict]]) -> str:
    """Per scene set and model: nDCG@10, R@10, MRR of each image-query arm."""
    lines = []
    for regime, by_model in images.items():
        n = next(iter(next(iter(by_model.values())).values()))["queries"]
        lines += [f"\n**image queries: {regime} scenes** ({n} scenes)\n", "| model | query | nDCG@10 | R@10 | MRR |", "|---|---|---|---|---|"]
        for model, arms in by_model.items():
            for arm, m in arms.items():
                lines.append(f"| {model} | {arm} | {m['ndcg@10']:.3f} | {m['r@10']:.3f} | {m['mrr']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the Myntra folder (styles.csv, images/)")
    p.add_argument("--work", default="runs/search_quality", help="the catalog and the indexes go here")
    p.add_argument("--out", default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--model", help="an ECLIP model folder, config.json + model.safetensors (e.g. runs/sp/eclip_320/model)")
    p.add_argument("--baseline", help="a CLIP-baseline model folder trained by the same code (e.g. runs/sp/clip_320/model)")
    p.add_argument("--init", default=None, help="without --model/--baseline: an untrained preset as the dense arm "
                                                "(eclip-lite: its pretrained towers; tiny: random, a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (experiments/small_products': 0)")
    p.add_argument("--train-products", type=int, default=2000)
    p.add_argument("--heldout-products", type=int, default=1000)
    p.add_argument("--validation-products", type=int, default=300)
    p.add_argument("--split", choices=("heldout", "validation"), default="heldout",
                   help="which untrained-on products to search (validation: leaves a --validation-only run's held-out split unread)")
    p.add_argument("--queries-per-kind", type=int, default=200)
    p.add_argument("--scenes", action="append", default=[], metavar="NAME=CATALOG",
                   help="image queries: a catalog of composed scenes of the searched products (repeatable)")
    p.add_argument("--scenes-per-set", type=int, default=0, help="at most this many scenes per --scenes (a seeded sample; 0: all)")
    p.add_argument("--hint-weights", default="0.25,0.5", help="text weights of the hinted image queries")
    p.add_argument("--hint-template", default="the {}", help="the hint, filled with the scene product's article type")
    p.add_argument("--image-size", type=int, default=224, help="for --init")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="100 held-out products, 20 queries per kind, untrained tiny model")
    args = p.parse_args(argv)
    if args.quick:
        shrink_for_quick(p, args, "runs/search_quality_quick", heldout_products=100, queries_per_kind=20, image_size=64)
        args.init = args.init or "tiny"
    scene_sets = {}
    for spec in args.scenes:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--scenes takes NAME=CATALOG, got {spec!r}")
        scene_sets[name] = Path(path)
    hint_weights = [float(w) for w in args.hint_weights.split(",") if w.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    loads = [os.getloadavg()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    products = myntra_catalog(Path(args.data), work)
    _, heldout, validation = split_by_product(products, args.train_products, args.heldout_products, args.seed, args.validation_products)
    if args.split == "validation":
        heldout = validation
    queries = build_queries(heldout, args.queries_per_kind, args.seed)
    logger.info("%d %s products, %d queries, load %s", len(heldout), args.split, len(queries), loads[0])
    scenes = {name: scene_queries(path, heldout, args.scenes_per_set, args.seed) for name, path in scene_sets.items()}

    sources: dict[str, str | None] = {}
    if args.model:
        sources["ECLIP"] = args.model
    if args.baseline:
        sources["CLIP"] = args.baseline
    if not sources:
        sources[f"untrained {args.init or 'eclip-lite'}"] = None

    results: dict[str, dict] = {}
    fusion: dict[str, dict] = {}
    images: dict[str, dict[str, dict]] = {name: {} for name in scenes}
    timings: dict[str, float] = {}
    lexical_lists: dict = {}
    lexical_done = False
    for name, source in sources.items():
        start = time.perf_counter()
        if source is None:
            model = untrained(args.init or "eclip-lite", args.image_size, args.seed)
            index = index_products(model, heldout)
        else:
            model = load_model(source, device="cpu")
            index = cached_index(model, heldout, work / f"index-{name}-{args.split}", str(Path(source).resolve()))
        searcher = Searcher(model, index)
        searcher.embed_text = functools.lru_cache(maxsize=None)(searcher.embed_text)  # every arm shares a query's vector
        timings[f"index {name}"] = time.perf_counter() - start
        arms = {f"dense {name}": "dense", f"hybrid {name}": "hybrid"}
        if not lexical_done:
            arms = {"lexical (BM25)": "lexical", **arms}
            lexical_done = True
        for arm, mode in arms.items():
            def rank(text, filters, searcher=searcher, mode=mode):
                return [r.product_id for r in searcher.search_text(text, K, filters=filters, mode=mode)]

            results[arm] = {"none": evaluate_arm(rank, queries, False), "filtered": evaluate_arm(rank, queries, True)}
            logger.info("%s: %s", arm, results[arm]["none"]["all"])
        fusion[name] = evaluate_fusions(searcher, queries, lexical_lists)
        for regime, scene_list in scenes.items():
            start = time.perf_counter()
            images[regime][name] = evaluate_scenes(searcher, scene_list, hint_weights, args.hint_template)
            timings[f"scenes {regime} {name}"] = time.perf_counter() - start
            logger.info("%s scenes, %s: %s", regime, name, images[regime][name])
        loads.append(os.getloadavg())
    kinds = [k for k in ["all", "attributes", "brand", "partial", "synonyms"] if k in results[next(iter(results))]["none"]]
    report = table(results, kinds) + "\n" + fusion_table(fusion, kinds) + ("\n" + image_table(images) if images else "")
    print(report)
    out = Path(args.out or work / "results.json")
    examples = {kind: [q.text for q in queries if q.kind == kind][:5] for kind in ("attributes", "brand", "partial", "synonyms")}
    out.write_text(json.dumps({"config": vars(args), "split": args.split, "heldout_products": len(heldout), "queries": len(queries),
                               "examples": examples, "results": results, "hybrid_dense_weight": DENSE_WEIGHT, "fusion": fusion, "images": images,
                               "seconds": timings, "load_average": loads}, indent=2))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
