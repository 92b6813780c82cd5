"""Search quality on shopper-style queries over held-out Myntra products: nDCG@10, R@10 and MRR
of dense (ECLIP, the CLIP baseline), lexical (BM25) and hybrid (reciprocal rank fusion)
ranking, without and with a facet filter.

    python experiments/search_quality/search_quality.py --model runs/sp/eclip_320 --baseline runs/sp/clip_320
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
   - `partial`: 2-3 consecutive words from the middle of a title ("jace sko white").
   `type` is the title's last word (Myntra titles end with the article type: Tshirts, Skirts,
   Shoes), since styles.csv's subCategory is coarser (Topwear, Shoes).
3. Graded relevance (`relevance`): a query stands for a set of attribute conditions; a product
   meeting all of them is 2, some of them 1, none 0. Partial titles: 2 if the title contains
   the words, 1 if the product shares the source's brand or type.
4. Metrics per query, averaged: nDCG@10 (graded gains 2^rel - 1, the ideal from every held-out
   product), R@10 = fully relevant products in the top 10 / min(10, fully relevant products),
   MRR = 1 / rank of the first fully relevant product (0 if none in the top 10).
5. With filters: the same query with the facet a shopper would click (gender for attribute
   queries, subCategory for the others) as a `ProductIndex` filter.

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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `experiments.` imports from any cwd

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eclip.data import Product  # noqa: E402
from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.model import ECLIP  # noqa: E402
from eclip.presets import model_preset  # noqa: E402
from eclip_app.search.index import ProductIndex  # noqa: E402
from eclip_app.search.searcher import Searcher  # noqa: E402
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


def product_type(product: Product) -> str:
    """The article type: the title's last word (Myntra titles end with it)."""
    words = _words(product.title)
    return words[-1].lower() if words else ""


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
    queries: dict[str, dict[str, Query]] = {"attributes": {}, "brand": {}, "partial": {}}
    for p in order:
        f = fields(p)
        colour, gender, usage, kind = f.get("basecolour"), f.get("gender"), f.get("usage"), f.get("type")
        if not kind:
            continue
        candidates = []
        if colour and gender:
            candidates.append(Query("attributes", f"{colour} {kind} for {gender}",
                                    {"basecolour": colour, "type": kind, "gender": gender}, {"gender": gender}, p.product_id))
        if gender and usage:
            candidates.append(Query("attributes", f"{gender} {usage} {kind}",
                                    {"gender": gender, "usage": usage, "type": kind}, {"gender": gender}, p.product_id))
        if f["brand"] and f["brand"] != kind:
            candidates.append(Query("brand", f"{f['brand']} {kind}", {"brand": f["brand"], "type": kind},
                                    {"category": p.category} if p.category else {}, p.product_id))
        words = _words(p.title)
        if len(words) >= 5:
            n = rng.choice([2, 3])
            start = rng.randrange(1, len(words) - n)  # not the brand alone, not the type alone
            phrase = " ".join(words[start : start + n]).lower()
            candidates.append(Query("partial", phrase, {"brand": f["brand"], "type": kind},
                                    {"category": p.category} if p.category else {}, p.product_id, phrase=phrase))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the Myntra folder (styles.csv, images/)")
    p.add_argument("--work", default="runs/search_quality", help="the catalog goes here")
    p.add_argument("--out", default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--model", help="an ECLIP model folder (e.g. runs/sp/eclip_320)")
    p.add_argument("--baseline", help="a CLIP-baseline model folder trained by the same code (e.g. runs/sp/clip_320)")
    p.add_argument("--init", default=None, help="without --model/--baseline: an untrained preset as the dense arm "
                                                "(eclip-lite: its pretrained towers; tiny: random, a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (experiments/small_products': 0)")
    p.add_argument("--train-products", type=int, default=2000)
    p.add_argument("--heldout-products", type=int, default=1000)
    p.add_argument("--validation-products", type=int, default=300)
    p.add_argument("--split", choices=("heldout", "validation"), default="heldout",
                   help="which untrained-on products to search (validation: leaves a --validation-only run's held-out split unread)")
    p.add_argument("--queries-per-kind", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224, help="for --init")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="100 held-out products, 20 queries per kind, untrained tiny model")
    args = p.parse_args(argv)
    if args.quick:
        shrink_for_quick(p, args, "runs/search_quality_quick", heldout_products=100, queries_per_kind=20, image_size=64)
        args.init = args.init or "tiny"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    products = myntra_catalog(Path(args.data), work)
    _, heldout, validation = split_by_product(products, args.train_products, args.heldout_products, args.seed, args.validation_products)
    if args.split == "validation":
        heldout = validation
    queries = build_queries(heldout, args.queries_per_kind, args.seed)
    logger.info("%d held-out products, %d queries", len(heldout), len(queries))

    models: dict[str, ECLIP] = {}
    if args.model:
        models["ECLIP"] = load_model(args.model)
    if args.baseline:
        models["CLIP"] = load_model(args.baseline)
    if not models:
        preset = args.init or "eclip-lite"
        models[f"untrained {preset}"] = untrained(preset, args.image_size, args.seed)

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    lexical_done = False
    for name, model in models.items():
        start = time.perf_counter()
        searcher = Searcher(model, index_products(model, heldout))
        searcher.embed_text = functools.lru_cache(maxsize=None)(searcher.embed_text)  # dense and hybrid share a query's vector
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
    kinds = ["all", "attributes", "brand", "partial"]
    report = table(results, [k for k in kinds if k in results[next(iter(results))]["none"]])
    print(report)
    out = Path(args.out or work / "results.json")
    examples = {kind: [q.text for q in queries if q.kind == kind][:5] for kind in ("attributes", "brand", "partial")}
    out.write_text(json.dumps({"config": vars(args), "heldout_products": len(heldout), "queries": len(queries),
                               "examples": examples, "results": results, "seconds": timings}, indent=2))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
