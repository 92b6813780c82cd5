"""Filtered product search: recall@10 against exact filtered search, and latency, at filter
selectivities 50 %, 5 % and 0.5 %; and the BM25 side (build from titles, query latency).

The index alone (`ProductIndex`, no model): clustered 512-d unit vectors (benchmarks/search.py's
generator), one per product, HNSW as `kind="auto"` builds it above 50,000 vectors. Each product
gets three facets drawn at random, independent of its vector (the hard case for a graph: the
selected products are scattered over it): `s50` (2 values), `s5` (20), `s05` (200); a filter
keeps one value. The truth is the exact index (flat) under the same filter. Rows per
selectivity: the index's own rule (`auto`), and each path forced (`selector`: HNSW with an id
selector and the widened beam; `scan`: exact scan of the selected ids), so the rule's threshold
can be read off. Latency: single-query searches on 1 FAISS thread, wall-clock and CPU time of
the searching thread (on a shared machine the wall-clock tail is mostly waiting for a core);
the filter's mask (numpy over the facet columns) is part of each search.

    python benchmarks/filtered_search.py --quick            # 20k vectors, a minute
    python benchmarks/filtered_search.py --size 1000000     # the target size
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time

import faiss
import numpy as np

import eclip_app.search.index as index_module
from eclip_app.search.index import ProductIndex
from search import clustered_vectors  # benchmarks/search.py, beside this file

SELECTIVITIES = {"50 %": ("s50", 2), "5 %": ("s5", 20), "0.5 %": ("s05", 200)}
COLOURS = ["navy blue", "red", "black", "white", "green", "grey", "pink", "brown"]
KINDS = ["tshirts", "shirts", "jeans", "sandals", "casual shoes", "sports shoes", "watches", "handbags", "kurtas", "tops"]


def catalog(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    facets = {key: rng.integers(0, values, n) for key, values in SELECTIVITIES.values()}
    colour, kind, brand = rng.integers(0, len(COLOURS), n), rng.integers(0, len(KINDS), n), rng.integers(0, 500, n)
    return [{"title": f"Brand{brand[i]} {COLOURS[colour[i]]} {KINDS[kind[i]]} {i}",
             **{key: f"v{facets[key][i]}" for key, _ in SELECTIVITIES.values()}} for i in range(n)]


def timed(index: ProductIndex, queries: np.ndarray, filters: dict) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    wall, cpu, results = [], [], []
    for q in queries:
        start, start_cpu = time.perf_counter(), time.thread_time()
        hits = index.search(q[None, :], 10, filters=filters)[0]
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
        results.append([pid for pid, _ in hits])
    return np.array(wall) * 1000, np.array(cpu) * 1000, results


def recall(results: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(r) & set(t)) / max(1, len(t)) for r, t in zip(results, truth)]))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="products (one vector each)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for the builds and the batched truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20,000 vectors, 50 queries")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.queries = 20_000, 50
    n = args.size
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"load {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    data = clustered_vectors(n + args.queries, args.dim, seed=args.seed)
    queries, data = data[n:].copy(), data[:n]
    ids = [f"p{i:07d}" for i in range(n)]
    meta = catalog(n, args.seed)

    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    flat = ProductIndex.build(data, ids, meta, kind="flat")
    start_hnsw = time.perf_counter()
    hnsw = ProductIndex.build(data, ids, meta, kind="hnsw")
    built = time.perf_counter()
    print(f"built: flat {start_hnsw - start:.0f} s, hnsw {built - start_hnsw:.0f} s ({hnsw.params})", flush=True)
    del data

    rows = []
    rule = index_module.EXACT_FILTER_VECTORS
    for label, (key, _) in [("100 % (no filter)", (None, 1)), *SELECTIVITIES.items()]:
        filters = {key: "v0"} if key else None
        faiss.omp_set_num_threads(args.threads)
        truth = [[pid for pid, _ in hits] for hits in flat.search(queries, 10, filters=filters)]
        faiss.omp_set_num_threads(1)
        selected = n if key is None else sum(1 for m in meta if m[key] == "v0")
        routes = [("auto", rule)] if key is None else [("auto", rule), ("selector", -1), ("scan", n + 1)]
        for route, threshold in routes:
            index_module.EXACT_FILTER_VECTORS = threshold
            wall, cpu, results = timed(hnsw, queries, filters)
            used = "hnsw" if key is None else ("scan" if selected <= threshold else "selector")
            rows.append([label, f"{selected:,}", route + (f" ({used})" if route == "auto" else ""), f"{recall(results, truth):.3f}",
                         *(f"{v:.2f}" for v in np.percentile(wall, [50, 95])), *(f"{v:.2f}" for v in np.percentile(cpu, [50, 95]))])
            print(" | ".join(rows[-1]), flush=True)
        index_module.EXACT_FILTER_VECTORS = rule
    header = ["selectivity", "selected", "path", "recall@10 / exact", "p50 ms", "p95 ms", "CPU p50 ms", "CPU p95 ms"]
    print(f"\n{n:,} products, {args.dim}-d, {args.queries} queries, k=10, HNSW {hnsw.params}, "
          f"exact-scan rule: <= {rule:,} selected vectors\n")
    print(table(header, rows))

    # BM25: built from the titles on the first lexical query (and after an add), never saved
    words = ["navy blue tshirts", "sports shoes", "Brand17 watches", "black handbags", "red kurtas"]
    start, start_cpu = time.perf_counter(), time.thread_time()
    hnsw.search_lexical(words[0], 10)
    build, build_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    wall, cpu = [], []
    for i in range(args.queries):
        start, start_cpu = time.perf_counter(), time.thread_time()
        hnsw.search_lexical(words[i % len(words)], 10, filters={"s5": "v0"} if i % 2 else None)
        cpu.append((time.thread_time() - start_cpu) * 1000)
        wall.append((time.perf_counter() - start) * 1000)
    print("\n" + table(["products", "BM25 build s (titles + facets)", "build CPU s", "query p50 / p95 ms", "CPU p50 / p95 ms"],
                       [[f"{n:,}", f"{build:.1f}", f"{build_cpu:.1f}", "{:.2f} / {:.2f}".format(*np.percentile(wall, [50, 95])),
                         "{:.2f} / {:.2f}".format(*np.percentile(cpu, [50, 95]))]]))
    print(f"\nload after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
