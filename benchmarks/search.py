"""Product search benchmarks, one section per part of the search stack.

Sections (`--sections`, comma separated, default all):

- `index`: the FAISS index alone (ProductIndex, no model). Random but clustered 512-d float32
  vectors (1000 Gaussian clusters with a decaying spectrum inside each cluster, like real
  embeddings), one vector per product. For each size: exact search (flat) as the reference,
  HNSW at several efSearch values, IVF-PQ at the default 1 GiB budget; recall@10 against exact,
  p50/p95/p99 latency of single-query searches (one FAISS thread: the per-request cost), in
  wall-clock and in CPU time of the searching thread (on a shared machine the wall-clock tail
  is mostly waiting for a core), QPS of one client (1 / mean latency), build time and memory.

More sections (HTTP /search latency, ONNX encoders) register themselves in SECTIONS with a
function `(args) -> str` (a Markdown table) and, optionally, their arguments in ARGUMENTS.

    python benchmarks/search.py --quick                         # 20k vectors, a minute
    python benchmarks/search.py --sizes 100000,1000000          # the BENCHMARKS.md table
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable

import faiss
import numpy as np

from eclip_app.search.index import ProductIndex, estimate_bytes

# ----------------------------------------------------------------------------- data


def clustered_vectors(n: int, dim: int = 512, clusters: int = 1000, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) unit vectors: a random cluster centre plus noise of norm ~1 whose spectrum decays
    as 1/sqrt(j) in a random basis (isotropic noise in 512-d is unrealistically easy for HNSW;
    noise in very few directions is unrealistically hard). Deterministic per (n, seed)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    spectrum /= np.sqrt((spectrum**2).sum())
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(n, start + chunk) - start
        labels = rng.integers(0, clusters, m)
        noise = (rng.standard_normal((m, dim), dtype=np.float32) * spectrum) @ basis
        out[start : start + m] = centres[labels] + noise
    faiss.normalize_L2(out)
    return out


# ----------------------------------------------------------------------------- index section


def _latencies(index: ProductIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Wall-clock and CPU (this thread) milliseconds per single-query search. On a shared
    machine the wall-clock tail includes time the process waited for a core; the CPU time is
    the index's own cost."""
    wall, cpu, results = [], [], []
    for q in queries:
        start, start_cpu = time.perf_counter(), time.thread_time()
        hits = index.search(q[None, :], k)[0]
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
        results.append([pid for pid, _ in hits])
    return np.array(wall) * 1000, np.array(cpu) * 1000, results


def _recall(results: list[list[str]], truth: list[list[str]], k: int) -> float:
    return float(np.mean([len(set(r[:k]) & set(t[:k])) / k for r, t in zip(results, truth)]))


def _row(size, name, params, build_s, recall, ms, cpu_ms, mem_mb) -> list[str]:
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    c50, c95, c99 = np.percentile(cpu_ms, [50, 95, 99])
    return [f"{size:,}", name, params, f"{build_s:.1f}", f"{recall:.3f}", f"{p50:.3f}", f"{p95:.3f}",
            f"{p99:.3f}", f"{c50:.3f} / {c95:.3f} / {c99:.3f}", f"{1000 / ms.mean():,.0f}",
            f"{1000 / cpu_ms.mean():,.0f}", f"{mem_mb:,.0f}"]


def index_section(args) -> str:
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    dim, k = args.dim, 10
    ef_values = [int(e) for e in args.ef_search.split(",")]
    header = ["vectors", "index", "parameters", "build s", "recall@10", "p50 ms", "p95 ms", "p99 ms",
              "CPU ms p50 / p95 / p99", "QPS (wall)", "QPS (CPU)", "memory MB"]
    rows = []
    for n in sizes:
        print(f"[index] {n:,} vectors: generating", flush=True)
        data = clustered_vectors(n + args.queries, dim, seed=args.seed)
        queries = data[n:].copy()
        data = data[:n]
        ids = [f"p{i:07d}" for i in range(n)]
        meta = [{}] * n  # the index copies each dict; the benchmark measures vectors, not titles

        faiss.omp_set_num_threads(args.threads)
        start = time.perf_counter()
        flat = ProductIndex.build(data, ids, meta, kind="flat")
        build = time.perf_counter() - start
        truth = [[pid for pid, _ in hits] for hits in flat.search(queries, k)]  # batched: fast
        faiss.omp_set_num_threads(1)
        n_flat = min(len(queries), args.flat_queries)
        ms, cpu, _ = _latencies(flat, queries[:n_flat], k)
        rows.append(_row(n, "flat (exact)", "-", build, 1.0, ms, cpu, estimate_bytes("flat", n, dim) / 2**20))
        print(" | ".join(rows[-1]), flush=True)
        del flat
        gc.collect()

        faiss.omp_set_num_threads(args.threads)
        params = {"M": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": ef_values[0]}
        start = time.perf_counter()
        hnsw = ProductIndex.build(data, ids, meta, kind="hnsw", params=params)
        build = time.perf_counter() - start
        faiss.omp_set_num_threads(1)
        for ef in ef_values:
            hnsw.params["ef_search"] = ef
            ms, cpu, results = _latencies(hnsw, queries, k)
            rows.append(_row(n, "hnsw", f"M={args.hnsw_m} efC={args.ef_construction} efS={ef}", build,
                             _recall(results, truth, k), ms, cpu, estimate_bytes("hnsw", n, dim) / 2**20))
            print(" | ".join(rows[-1]), flush=True)
        del hnsw
        gc.collect()

        if not args.skip_ivfpq:
            faiss.omp_set_num_threads(args.threads)
            start = time.perf_counter()
            ivf = ProductIndex.build(data, ids, meta, kind="ivfpq", memory_budget_mb=1024)
            build = time.perf_counter() - start
            faiss.omp_set_num_threads(1)
            p = ivf.params
            for nprobe in (p["nprobe"], 4 * p["nprobe"]):
                ivf.params["nprobe"] = nprobe
                ms, cpu, results = _latencies(ivf, queries, k)
                rows.append(_row(n, "ivfpq", f"nlist={p['nlist']} m={p['pq_m']} nprobe={nprobe}", build,
                                 _recall(results, truth, k), ms, cpu, estimate_bytes("ivfpq", n, dim, p["pq_m"]) / 2**20))
                print(" | ".join(rows[-1]), flush=True)
            del ivf
        del data
        gc.collect()
    faiss.omp_set_num_threads(args.threads)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\n{dim}-d float32, {args.queries} queries from the same distribution, k={k}; "
            f"build with {args.threads} FAISS thread(s), searches one query at a time on 1 thread. "
            "Flat latency over the first " f"{args.flat_queries} queries.")
    return "\n".join(lines) + "\n" + note


def index_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index section")
    group.add_argument("--sizes", default="100000,1000000", help="vector counts, comma separated")
    group.add_argument("--dim", type=int, default=512)
    group.add_argument("--queries", type=int, default=1000)
    group.add_argument("--flat-queries", type=int, default=200, help="single-query latency of the exact scan over this many queries")
    group.add_argument("--hnsw-m", type=int, default=32)
    group.add_argument("--ef-construction", type=int, default=80)
    group.add_argument("--ef-search", default="32,64,128,256", help="efSearch values to sweep")
    group.add_argument("--skip-ivfpq", action="store_true")
    group.add_argument("--threads", type=int, default=2, help="FAISS threads for builds")
    group.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- wrapper section
# (ProductIndex.search against the raw FAISS index inside it: the wrapper's overhead)


def _paired_latencies(index: ProductIndex, raw: faiss.Index, queries: np.ndarray, k: int):
    """Per query, ProductIndex.search and the raw index's search one after the other, the
    order alternating; (wall ms, CPU ms) for each and the number of identical top-k lists."""
    times = {"wrapper": ([], []), "raw": ([], [])}
    calls = {"wrapper": lambda q: index.search(q, k), "raw": lambda q: raw.search(q, k)}
    same = 0
    for i in range(len(queries)):
        q = queries[i : i + 1]
        out = {}
        for name in ("wrapper", "raw") if i % 2 == 0 else ("raw", "wrapper"):
            start, start_cpu = time.perf_counter(), time.thread_time()
            out[name] = calls[name](q)
            times[name][1].append(time.thread_time() - start_cpu)
            times[name][0].append(time.perf_counter() - start)
        same += [pid for pid, _ in out["wrapper"][0]] == [f"p{int(j):07d}" for j in out["raw"][1][0]]
    wrapper, raw_ = (tuple(np.array(t) * 1000 for t in times[name]) for name in ("wrapper", "raw"))
    return wrapper, raw_, same


def wrapper_section(args) -> str:
    """For each size: one HNSW ProductIndex, then per query `ProductIndex.search(q, k)` and the
    raw FAISS index it holds (`index.search(q, k)` with the same efSearch) one after the other,
    in alternating order, so both see the same load; wall-clock and CPU time of this thread."""
    sizes = [20_000] if args.quick else [int(s) for s in args.wrapper_sizes.split(",")]
    dim, k, ef = args.wrapper_dim, 10, args.wrapper_ef_search
    header = ["vectors", "build s", "ProductIndex p50 / p95 ms", "raw FAISS p50 / p95 ms", "ratio p50 / p95",
              "CPU ms ProductIndex p50 / p95", "CPU ms raw p50 / p95", "CPU ratio p50 / p95", "same top-10"]
    rows = []
    for n in sizes:
        print(f"[wrapper] {n:,} vectors: generating", flush=True)
        data = clustered_vectors(n + args.queries, dim, seed=args.seed)
        queries = data[n:].copy()
        data = data[:n]
        faiss.omp_set_num_threads(args.threads)
        start = time.perf_counter()
        index = ProductIndex.build(data, [f"p{i:07d}" for i in range(n)], [{}] * n, kind="hnsw",
                                   params={"M": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": ef})
        build = time.perf_counter() - start
        print(f"[wrapper] built in {build:.0f} s", flush=True)
        del data
        raw = index._index  # the FAISS index ProductIndex searches
        raw.hnsw.efSearch = ef
        faiss.omp_set_num_threads(1)
        _paired_latencies(index, raw, queries, k)  # warm-up pass: caches, first-touch pages
        (w_wall, w_cpu), (r_wall, r_cpu), same = _paired_latencies(index, raw, queries, k)
        w, r = np.percentile(w_wall, [50, 95]), np.percentile(r_wall, [50, 95])
        wc, rc = np.percentile(w_cpu, [50, 95]), np.percentile(r_cpu, [50, 95])
        rows.append([f"{n:,}", f"{build:.0f}", f"{w[0]:.3f} / {w[1]:.3f}", f"{r[0]:.3f} / {r[1]:.3f}",
                     f"{w[0] / r[0]:.2f}x / {w[1] / r[1]:.2f}x", f"{wc[0]:.3f} / {wc[1]:.3f}", f"{rc[0]:.3f} / {rc[1]:.3f}",
                     f"{wc[0] / rc[0]:.2f}x / {wc[1] / rc[1]:.2f}x", f"{same / len(queries):.3f}"])
        print(" | ".join(rows[-1]), flush=True)
        del index, raw
        gc.collect()
    faiss.omp_set_num_threads(args.threads)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\n{dim}-d float32 clustered unit vectors, one per product; HNSW M={args.hnsw_m}, "
            f"efConstruction={args.ef_construction} (built with {args.threads} FAISS threads), efSearch={ef}, k={k}, "
            f"{args.queries} queries from the index's distribution, one at a time on 1 FAISS thread; each query "
            "timed through ProductIndex.search (normalisation check, read lock, FAISS, id -> product, "
            "distinct products) and through the raw FAISS index it holds, in alternating order. \"same top-10\": "
            "share of queries whose 10 product ids equal the raw index's 10 ids, in order.")
    return "\n".join(lines) + "\n" + note


def wrapper_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("wrapper section")
    group.add_argument("--wrapper-sizes", default="100000,1000000", help="vector counts, comma separated")
    group.add_argument("--wrapper-dim", type=int, default=256)
    group.add_argument("--wrapper-ef-search", type=int, default=128)


# ----------------------------------------------------------------------------- registry

# name -> function(args) -> Markdown; other sections append here
SECTIONS: dict[str, Callable[[argparse.Namespace], str]] = {"index": index_section, "wrapper": wrapper_section}
ARGUMENTS: list[Callable[[argparse.ArgumentParser], None]] = [index_arguments, wrapper_arguments]


# ----------------------------------------------------------------------------- http section
# (eclip serve: /search by text end to end, against uvicorn on loopback)

HTTP_QUERIES = ["red striped shirt", "blue denim jeans", "black leather handbag", "white running shoes",
                "green summer dress", "yellow rain jacket", "grey wool scarf", "brown ankle boots",
                "pink floral blouse", "navy baseball cap", "orange backpack", "silver wrist watch"]


def _http_fixture(folder: str, n: int, preset: str, encoders: list[str], seed: int, threads: int) -> dict:
    """In `folder`: a `preset` model (pretrained towers where the preset has them, untrained
    heads: latency only) as a model folder and, for the onnx encoder, its `eclip export --onnx`
    folder; n products of random clustered unit vectors with metadata as a saved index. Built
    once here, so each server process only loads them, as `eclip serve` does."""
    from pathlib import Path

    import torch

    import eclip
    from eclip.io import save_model

    folder = Path(folder)
    torch.manual_seed(seed)
    model = eclip.create_model(preset).eval()
    save_model(model, folder / "model")
    if "onnx" in encoders:
        from eclip_app.search.export import export_onnx

        export_onnx(model, folder / "onnx")
    vectors = clustered_vectors(n, model.config.embed_dim, seed=seed)
    colours = ["red", "blue", "black", "white", "green", "yellow", "grey", "brown"]
    kinds = ["shirt", "jeans", "handbag", "shoes", "dress", "jacket", "scarf", "boots"]
    meta = [{"title": f"{colours[i % 8]} {kinds[(i // 8) % 8]} model {i}", "category": kinds[(i // 8) % 8],
             "attributes": {"colour": colours[i % 8], "size": "M"}, "image_path": f"/srv/catalog/images/p{i:07d}.jpg"}
            for i in range(n)]
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = ProductIndex.build(vectors, [f"p{i:07d}" for i in range(n)], meta, kind="auto")
    build_s = time.perf_counter() - start
    index.save(folder / "index")
    return {"kind": index.kind, "build_s": build_s, "image_size": model.image_size,
            "context_length": model.tokenizer.context_length}


def _http_server(conn, folder: str, torch_threads: int, encoder: str = "torch") -> None:
    """Child process: `eclip serve`'s app over the fixture in `folder` (`_http_fixture`), under
    uvicorn on a free loopback port (sent back on conn). encoder "onnx": the export, served
    through onnxruntime (`eclip serve --onnx`)."""
    import socket
    from pathlib import Path

    import uvicorn

    from eclip_app.search.serve import SearchService, ServeSettings, create_app

    faiss.omp_set_num_threads(1)  # one query per request: no parallelism to gain, only contention
    folder = Path(folder)
    onnx = folder / "onnx" if encoder == "onnx" else None
    service = SearchService.load(folder / "model", folder / "index", onnx_folder=onnx, threads=torch_threads)
    app = create_app(service, ServeSettings())
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; with a bare socket() every
    # keep-alive response would wait ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    conn.send({"port": sock.getsockname()[1]})
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def _query_photo(seed: int = 0, size: tuple[int, int] = (480, 360)) -> bytes:
    """A JPEG query photo (shapes on a textured background), as a phone upload would be: the
    server decodes it and resizes it to the model's input size."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pixels = (rng.integers(90, 200, (size[1] // 8, size[0] // 8, 3))).astype(np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, size[0] - 120)), int(rng.integers(0, size[1] - 120))
        draw.rectangle([x, y, x + 110, y + 110], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# what each request kind sends: (path, request arguments for client i, call n, the k asked)
HTTP_REQUESTS = {
    "search-text": lambda i, n, k, photo: ("/search", {"json": {"text": HTTP_QUERIES[(i * 5 + n) % len(HTTP_QUERIES)], "k": k}}),
    "search-image": lambda i, n, k, photo: ("/search", {"files": {"image": ("q.jpg", photo, "image/jpeg")}, "data": {"k": str(k)}}),
    "embed-text": lambda i, n, k, photo: ("/embed", {"json": {"text": [HTTP_QUERIES[(i * 5 + n) % len(HTTP_QUERIES)]]}}),
    "embed-image": lambda i, n, k, photo: ("/embed", {"files": {"image": ("q.jpg", photo, "image/jpeg")}}),
}


def _http_ok(kind: str, response, k: int) -> bool:
    if response.status_code != 200:
        return False
    body = response.json()
    return len(body["results"]) == k if kind.startswith("search") else len(body.get("text_embeddings") or body["image_embeddings"]) == 1


def _http_load(url: str, clients: int, seconds: float, k: int, kind: str = "search-text") -> tuple[np.ndarray, int]:
    """`clients` threads, each one keep-alive connection sending `kind` requests back to back."""
    import threading

    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    photo = _query_photo()

    def worker(i: int) -> None:
        mine, bad, n = [], 0, 0
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop:
                path, request = HTTP_REQUESTS[kind](i, n, k, photo)
                start = time.perf_counter()
                r = http.post(path, **request)
                mine.append(time.perf_counter() - start)
                bad += not _http_ok(kind, r, k)
                n += 1
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies) * 1000, errors[0]


def http_section(args) -> str:
    import multiprocessing
    import tempfile

    import httpx

    n = 20_000 if args.quick else args.http_products
    seconds = 3.0 if args.quick else args.http_seconds
    encoders = args.http_encoders.split(",")
    kinds = args.http_requests.split(",")
    unknown = [k for k in kinds if k not in HTTP_REQUESTS]
    if unknown:
        raise SystemExit(f"unknown --http-requests {unknown}; choose from {list(HTTP_REQUESTS)}")
    # spawn, not fork: the parent may already run OpenMP threads (the index section), which a
    # forked child inherits in a broken state
    ctx = multiprocessing.get_context("spawn")
    header = ["encoder", "request", "clients", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "QPS"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eclip-bench-http-") as folder:
        print(f"[http] {args.http_preset} model, its ONNX export and an index of {n:,} products", flush=True)
        info = _http_fixture(folder, n, args.http_preset, encoders, 0, args.threads)
        for encoder in encoders:
            parent, child = ctx.Pipe()
            server = ctx.Process(target=_http_server, args=(child, folder, args.http_torch_threads, encoder), daemon=True)
            print(f"[http] serving with {encoder}", flush=True)
            server.start()
            try:
                if not parent.poll(600):
                    raise RuntimeError("the benchmark server did not start")
                url = f"http://127.0.0.1:{parent.recv()['port']}"
                for _ in range(200):
                    try:
                        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.1)
                for kind in kinds:
                    _http_load(url, 2, 2.0, 10, kind)  # warm up: lazy inits, connection pools, caches
                    for clients in [int(c) for c in args.http_clients.split(",")]:
                        ms, errors = _http_load(url, clients, seconds, 10, kind)
                        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
                        rows.append([encoder, kind, str(clients), f"{len(ms):,}", str(errors), f"{p50:.1f}", f"{p95:.1f}",
                                     f"{p99:.1f}", f"{len(ms) / seconds:.0f}"])
                        print(" | ".join(rows[-1]), flush=True)
            finally:
                server.terminate()
                server.join(10)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\nEnd to end over HTTP against uvicorn on 127.0.0.1 in its own process (`SearchService.load`, as `eclip serve` "
            f"[--onnx]); `{args.http_preset}` model preset ({info['image_size']} px, {info['context_length']} tokens), "
            f"heads untrained (latency only); {info['kind']} index over {n:,} products of random clustered unit vectors "
            f"(built in {info['build_s']:.0f} s), with metadata. search-text: POST /search {{text, k=10}} (tokenise, text "
            "tower, index, metadata of the 10 hits, JSON); search-image: the same with a 480x360 JPEG upload (decode, "
            "resize, image tower, product embedding); embed-text / embed-image: POST /embed with one title / that JPEG. "
            f"torch (or onnxruntime) {args.http_torch_threads} thread(s) per request, FAISS 1 thread; each client a "
            f"keep-alive connection sending requests back to back for {seconds:.0f} s (clients run in the benchmark's process).")
    return "\n".join(lines) + "\n" + note


def http_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("http section")
    group.add_argument("--http-products", type=int, default=100_000)
    group.add_argument("--http-preset", default="tiny", help="model preset (eclip.create_model), e.g. eclip-lite")
    group.add_argument("--http-clients", default="1,4", help="concurrent clients, comma separated")
    group.add_argument("--http-seconds", type=float, default=15.0, help="duration per client count")
    group.add_argument("--http-encoders", default="torch,onnx", help="server encoders: torch (PyTorch), onnx (eclip serve --onnx)")
    group.add_argument("--http-requests", default="search-text",
                       help=f"request kinds, comma separated, from {', '.join(HTTP_REQUESTS)}")
    group.add_argument("--http-torch-threads", type=int, default=1,
                       help="torch threads in the server (requests already run in parallel)")


# ----------------------------------------------------------------------------- onnx section
# (eclip export --onnx: onnxruntime against PyTorch, embedding throughput)


def _throughput(fn, items: int, seconds: float) -> float:
    """items per second of fn(), after a warm-up, over at least `seconds` and 5 calls."""
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return items * calls / (time.perf_counter() - start)


def onnx_section(args) -> str:
    import tempfile

    import torch

    import eclip
    from eclip_app.search.export import OnnxEncoder, export_onnx

    torch.manual_seed(0)
    model = eclip.create_model(args.onnx_preset).eval()
    seconds = 1.0 if args.quick else args.onnx_seconds
    size = model.image_size
    default_threads = torch.get_num_threads()
    header = ["input", "batch", "threads", "PyTorch /s", "ONNX Runtime /s", "ONNX / PyTorch"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        report = export_onnx(model, folder)
        for threads in [int(t) for t in args.onnx_threads.split(",")]:
            # the same intra-op thread count on both sides
            torch.set_num_threads(threads)
            encoder = OnnxEncoder.load(folder, threads=threads)
            for batch in [int(b) for b in args.onnx_batches.split(",")]:
                images = torch.randn(batch, 3, size, size)
                array = images.numpy()
                titles = [HTTP_QUERIES[i % len(HTTP_QUERIES)] + f" size {i}" for i in range(batch)]

                def torch_images(images=images):
                    with torch.inference_mode():
                        model.product_embedding(images)

                def torch_texts(titles=titles):
                    with torch.inference_mode():
                        model.encode_text(titles)

                for name, pt, ort in [
                    ("images (product embedding)", torch_images, lambda array=array, enc=encoder: enc.product_embedding_numpy(array)),
                    ("texts (tokenise + embed)", torch_texts, lambda titles=titles, enc=encoder: enc.encode_text_numpy(titles)),
                ]:
                    a, b = _throughput(pt, batch, seconds), _throughput(ort, batch, seconds)
                    rows.append([name, str(batch), str(threads), f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}x"])
                    print(" | ".join(rows[-1]), flush=True)
    torch.set_num_threads(default_threads)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    worst = max(report.max_abs_diff.values())
    note = (f"\n`{args.onnx_preset}` preset ({size} px images, {model.tokenizer.context_length} tokens), "
            f"heads untrained (towers pretrained where the preset has them); PyTorch {torch.__version__} under inference_mode against ONNX Runtime's CPU provider, "
            f"both with the intra-op thread count of the row; largest |ONNX - PyTorch| over all outputs "
            f"{worst:.1e}. Items per second, each measurement timed for {seconds:.0f} s after a warm-up.")
    return "\n".join(lines) + "\n" + note


def onnx_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("onnx section")
    group.add_argument("--onnx-preset", default="tiny", help="model preset (eclip.create_model)")
    group.add_argument("--onnx-batches", default="1,32", help="batch sizes, comma separated")
    group.add_argument("--onnx-threads", default="1,2", help="intra-op threads (both runtimes), comma separated")
    group.add_argument("--onnx-seconds", type=float, default=5.0, help="timing per measurement")


SECTIONS.update({"http": http_section, "onnx": onnx_section})
ARGUMENTS += [http_arguments, onnx_arguments]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=None, help=f"comma separated, from {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute per section")
    for add in ARGUMENTS:
        add(parser)
    args = parser.parse_args(argv)
    names = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    print(f"# machine: {platform.machine()}, {faiss.omp_get_max_threads()} OpenMP threads, faiss {faiss.__version__}")
    for name in names:
        start = time.perf_counter()
        table = SECTIONS[name](args)
        print(f"\n## {name} ({time.perf_counter() - start:.0f} s)\n\n{table}\n", flush=True)


if __name__ == "__main__":
    main()
