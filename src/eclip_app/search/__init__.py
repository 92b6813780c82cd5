"""Product search (issue 5): embed a catalog to Parquet, index it with FAISS, query it.

    from eclip_app.search import Searcher
    searcher = Searcher.load("runs/demo/eclip/model", "runs/index")
    rows = searcher.search_text("red striped tee", k=10)   # SearchRow(rank, product_id, score, title, image_path)

`embed` (catalog -> Parquet, resumable, torchrun-split), `index` (ProductIndex: FAISS flat /
HNSW / IVF-PQ by product id) and `searcher` (model + index) are the parts.
"""

from .embed import Embeddings, EmbedError, EmbedReport, embed_catalog, load_embeddings
from .index import Hit, IndexFolderError, ProductIndex, choose_kind
from .searcher import GroundResult, Searcher, SearchRow

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
