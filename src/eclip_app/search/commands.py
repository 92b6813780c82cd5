"""The `eclip embed`, `eclip index` and `eclip search` subcommands (registered by cli.py).
Heavy imports (torch, faiss, pyarrow) happen inside the handlers so `eclip --help` stays fast."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fail(command: str, error: Exception, code: int = 1) -> int:
    print(f"eclip {command}: {error}", file=sys.stderr)
    return code


def _embed(args) -> int:
    from eclip.data import CatalogError

    from .embed import EmbedError, embed_catalog

    try:
        report = embed_catalog(args.model, args.catalog, args.out, part_size=args.part_size, batch_size=args.batch_size,
                               device=args.device, progress=not args.no_progress, max_parts=args.max_parts)
    except (EmbedError, CatalogError, FileNotFoundError, ValueError) as error:
        return _fail("embed", error)
    print(report.summary())
    for item in report.broken[:20]:
        print(f"  broken image: {item['image_path']} (product {item['product_id']}): {item['error']}", file=sys.stderr)
    if len(report.broken) > 20:
        print(f"  ... and {len(report.broken) - 20} more", file=sys.stderr)
    return 0


def _index(args) -> int:
    from .embed import EmbedError, index_embeddings

    start = time.perf_counter()
    try:
        index = index_embeddings(args.embeddings, kind=args.kind, memory_budget_mb=args.memory_budget_mb, field=args.field)
    except (EmbedError, ValueError) as error:
        return _fail("index", error)
    built = time.perf_counter() - start
    index.save(args.out)
    params = ", ".join(f"{k}={v}" for k, v in index.params.items()) or "exact"
    print(f"{len(index)} products ({index.num_vectors} image vectors, {index.dim}-d, field {args.field}) "
          f"-> {index.kind} index ({params}) in {built:.1f} s: {args.out}")
    return 0


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _search(args) -> int:
    from PIL import Image

    from eclip.data.transforms import load_rgb

    from .filters import FilterError
    from .index import IndexFolderError
    from .searcher import DENSE_WEIGHT, Searcher, check_dense_weight

    if args.text is None and args.image is None:
        return _fail("search", ValueError("give --text, --image or both"), 2)
    if args.text is not None and not args.text.strip():
        return _fail("search", ValueError("--text is empty"), 2)
    if args.mode != "dense" and args.text is None:
        return _fail("search", ValueError(f"--mode {args.mode} needs --text"), 2)
    try:
        dense_weight = DENSE_WEIGHT if args.dense_weight is None else check_dense_weight(args.dense_weight, "--dense-weight")
    except ValueError as error:
        return _fail("search", error, 2)
    query_image: Image.Image | None = None
    if args.image is not None:
        try:
            query_image = load_rgb(args.image)
        except (OSError, ValueError) as error:
            return _fail("search", ValueError(f"cannot read the query image {args.image}: {error}"), 2)
    try:
        searcher = Searcher.load(args.model, args.index, device=args.device)
    except (IndexFolderError, FileNotFoundError, ValueError) as error:
        return _fail("search", error)
    filters = args.filter or None
    try:
        if query_image is not None and args.text is not None:
            rows = searcher.search_image_text(query_image, args.text, args.k, text_weight=args.text_weight,
                                              filters=filters, mode=args.mode, tiles=args.tiles, dense_weight=dense_weight)
        elif query_image is not None:
            rows = searcher.search_image(query_image, args.k, filters=filters, tiles=args.tiles)
        else:
            rows = searcher.search_text(args.text, args.k, filters=filters, mode=args.mode, dense_weight=dense_weight)
        facets = searcher.facets(filters) if args.facets else None
    except FilterError as error:
        return _fail("search", error, 2)

    boxes: list[tuple[int, int, int, int] | None] = []
    if args.ground:
        for row in rows:
            # the query text says what to look for; an image-only query grounds the result's title
            text = args.text if args.text is not None else (row.title or "")
            path = row.image_path
            base = searcher.index.image_base()
            if path and base is not None and not Path(path).is_absolute():  # an index folder from before absolute paths
                path = str(base / path)
            try:
                result_image = load_rgb(path) if path else None
            except (OSError, ValueError):
                result_image = None  # the photo moved since indexing: no box, not a failure
            boxes.append(None if result_image is None else searcher.ground(result_image, text).box_pixels)

    if args.json:
        out = []
        for i, row in enumerate(rows):
            item = row.to_dict()
            if args.ground:
                item["box"] = None if boxes[i] is None else list(boxes[i])
            out.append(item)
        print(json.dumps(out if facets is None else {"results": out, "facets": facets}, indent=2))
        return 0
    headers = ["rank", "score", "product_id", "title", "image"] + (["box (x0,y0,x1,y1 px)"] if args.ground else [])
    table = []
    for i, row in enumerate(rows):
        cells = [str(row.rank), f"{row.score:.4f}", row.product_id, row.title or "", Path(row.image_path).name if row.image_path else ""]
        if args.ground:
            cells.append("-" if boxes[i] is None else ",".join(str(v) for v in boxes[i]))
        table.append(cells)
    print(format_table(headers, table))
    for key, counts in (facets or {}).items():
        print(f"{key}: " + ", ".join(f"{value} ({count})" for value, count in counts.items()))
    return 0


def add_search_commands(sub) -> None:
    """Register embed / index / search on the `eclip` subparsers."""
    em = sub.add_parser("embed", help="embed a catalog's images and titles into Parquet (resumable; split across torchrun ranks)",
                        description="Embed every image (product and global embedding) and every title of a catalog into "
                                    "Parquet parts. Rerun to resume; under torchrun each rank (RANK / WORLD_SIZE) takes a "
                                    "disjoint slice of the parts.")
    em.add_argument("--model", required=True, help="model folder (config.json + model.safetensors), or an `eclip export --onnx` folder: encode with onnxruntime")
    em.add_argument("--catalog", required=True, help="catalog (JSON Lines)")
    em.add_argument("--out", required=True, help="embeddings folder (manifest.json, images/, products/)")
    em.add_argument("--part-size", type=int, default=512, help="images (and products) per Parquet part: the unit of resumption")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--device", default="auto", help="where the model runs: cpu, cuda, ... (auto: CUDA when present; an ONNX export: the CPU)")
    em.add_argument("--max-parts", type=int, default=None, help="stop after writing this many parts (rerun to continue)")
    em.add_argument("--no-progress", action="store_true")
    em.set_defaults(func=_embed)

    ix = sub.add_parser("index", help="build a FAISS product index from an embeddings folder",
                        description="auto: flat (exact) below 50,000 vectors; else HNSW if vectors + graph fit "
                                    "--memory-budget-mb; else IVF-PQ.")
    ix.add_argument("--embeddings", required=True, help="folder written by `eclip embed`")
    ix.add_argument("--out", required=True, help="index folder (written atomically)")
    ix.add_argument("--kind", choices=["auto", "flat", "hnsw", "ivfpq"], default="auto")
    ix.add_argument("--memory-budget-mb", type=float, default=4096, help="the index's RAM budget (default 4 GiB: HNSW up to ~1.8M 512-d vectors)")
    ix.add_argument("--field", choices=["product", "global"], default="product",
                    help="which image embedding to index: the instance-level product embedding or the global one")
    ix.set_defaults(func=_index)

    se = sub.add_parser("search", help="top-k products for a text, an image, or both")
    se.add_argument("--model", required=True, help="model folder")
    se.add_argument("--index", required=True, help="index folder (`eclip index`)")
    se.add_argument("--text", help="query text")
    se.add_argument("--image", help="query image file")
    se.add_argument("-k", type=int, default=10, help="number of products")
    se.add_argument("--ground", action="store_true", help="box of the matching product in each result image")
    se.add_argument("--text-weight", type=float, default=0.5, help="weight of the text with --image and --text (0..1)")
    se.add_argument("--tiles", type=int, default=0, metavar="N",
                    help="also read the query image as N x N overlapping crops, for a product small in the photo (0: whole image only)")
    se.add_argument("--filter", action="append", metavar="KEY=VALUE",
                    help="only products whose facet matches (category, gender, baseColour, ... as the catalog records "
                         "them; case-insensitive); repeat for more: one key repeated = any of its values, "
                         "different keys = all; KEY>=X and KEY<=Y for numeric ranges")
    se.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="dense",
                    help="rank by the embedding (dense), BM25 over titles and attributes (lexical), "
                         "or both fused by reciprocal rank (hybrid); lexical and hybrid need --text")
    se.add_argument("--dense-weight", type=float, default=None, metavar="W",
                    help="hybrid: weight of the embedding's ranking in the fusion, BM25's being 1 (0.001-1000; "
                         "default: the library's, eclip_app.search.searcher.DENSE_WEIGHT)")
    se.add_argument("--facets", action="store_true", help="also print products per facet value under the filters")
    se.add_argument("--json", action="store_true", help="print JSON instead of a table (with --facets: {results, facets})")
    se.add_argument("--device", default="auto", help="where the model runs: cpu, cuda, ... (auto: CUDA when present, else the CPU)")
    se.set_defaults(func=_search)

