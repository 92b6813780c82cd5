"""Product search: embed a catalog to Parquet, index it with FAISS, query it.

    from eclip_app.search import Searcher
    searcher = Searcher.load("runs/demo/eclip/model", "runs/index")
    rows = searcher.search_text("red striped tee", k=10)   # SearchRow(rank, product_id, score, title, image_path)

`embed` (catalog -> Parquet, resumable, torchrun-split), `index` (ProductIndex: FAISS flat /
HNSW / IVF-PQ by product id) and `searcher` (model + index) are the parts.
"""

import importlib

# Names -> the submodule that defines them, imported on first use (PEP 562): the search extra
# (faiss, pyarrow) stays optional for everything else the CLI does.
_EXPORTS = {
    "Embeddings": "embed", "EmbedError": "embed", "EmbedReport": "embed", "embed_catalog": "embed",
    "load_embeddings": "embed", "Hit": "index", "IndexFolderError": "index", "ProductIndex": "index",
    "choose_kind": "index", "GroundResult": "searcher", "Searcher": "searcher", "SearchRow": "searcher",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EmbedError",
    "EmbedReport",
    "Embeddings",
    "GroundResult",
    "Hit",
    "IndexFolderError",
    "ProductIndex",
    "SearchRow",
    "Searcher",
    "choose_kind",
    "embed_catalog",
    "load_embeddings",
]
