"""Embed a catalog into Parquet: resumable, and split across processes under torchrun.

Layout of the output folder:

    manifest.json                 what was embedded (catalog and model hashes, part size, counts)
    images/part-00000.parquet     one row per image: product_id, image_index, image_path,
                                  product_embedding, global_embedding (fixed_size_list<float32>)
    products/part-00000.parquet   one row per product: product_id, title, category,
                                  attributes (JSON), image_paths, title_embedding

The work is cut into parts of `part_size` images (and `part_size` products for the titles), in
catalog order, so a part's content depends only on the catalog and the part size. A part is
written to a temporary file and renamed, so a part file exists only when it is complete; a
rerun skips the parts that exist (resumption) and a stray temporary file from a killed run is
removed. Under torchrun each process takes the parts `i % WORLD_SIZE == RANK` (RANK and
WORLD_SIZE from the environment, no process group needed): disjoint slices, the same files as
one process would write. An image that does not decode is skipped, counted and recorded in its
part's metadata; `load_embeddings` refuses an incomplete folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from eclip.data.catalog import Product, load_catalog
from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor
from eclip.devices import resolve_device
from eclip.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, load_model
from eclip.model.eclip import ECLIP

from .index import file_sha256

logger = logging.getLogger("eclip.search")

FORMAT = "eclip-embeddings"
FORMAT_VERSION = 1
PART_SIZE = 512
FIELDS = {"product": "product_embedding", "global": "global_embedding"}
BROKEN_KEY = b"eclip.broken"


class EmbedError(ValueError):
    pass


@dataclass
class EmbedReport:
    out_dir: Path
    rank: int
    world_size: int
    parts_total: int
    parts_mine: int = 0
    parts_skipped: int = 0  # already present (resumed)
    parts_written: int = 0
    images_embedded: int = 0
    broken: list[dict] = field(default_factory=list)  # images that did not decode
    catalog_skipped: Counter = field(default_factory=Counter)  # the catalog loader's report
    complete: bool = False  # all parts of all ranks present

    def summary(self) -> str:
        who = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        text = (f"{who}{self.parts_written} part(s) written, {self.parts_skipped} already done, "
                f"{self.images_embedded} images embedded, {len(self.broken)} broken image(s) skipped")
        if self.catalog_skipped:
            text += "; catalog loader skipped " + ", ".join(f"{n} {r}" for r, n in sorted(self.catalog_skipped.items()))
        state = "complete" if self.complete else "incomplete (other ranks still running, or rerun to resume)"
        return f"{text}; {self.out_dir} is {state}"


def is_onnx_export(folder: str | Path) -> bool:
    """An `eclip export --onnx` folder (rather than a model folder)."""
    from .export import IMAGE_FILE, TEXT_FILE

    folder = Path(folder)
    return (folder / IMAGE_FILE).is_file() and (folder / TEXT_FILE).is_file()


def model_fingerprint(folder: str | Path) -> str:
    """What the vectors depend on: the config and the weights (or the two ONNX graphs)."""
    from .export import IMAGE_FILE, TEXT_FILE

    folder = Path(folder)
    files = (CONFIG_NAME, IMAGE_FILE, TEXT_FILE) if is_onnx_export(folder) else (CONFIG_NAME, WEIGHTS_NAME)
    return hashlib.sha256("".join(file_sha256(folder / name) for name in files).encode()).hexdigest()


def load_encoder(folder: str | Path, device: str = "auto"):
    """The model in `folder` (PyTorch, on `device`; auto: CUDA when present), or its ONNX export
    on onnxruntime (the CPU): both answer encode_image / product_embedding_from / encode_text,
    which is all embedding needs."""
    if is_onnx_export(folder):
        from .export import OnnxEncoder

        if device not in ("cpu", "auto"):
            raise EmbedError(f"{folder} is an ONNX export: it runs on the CPU (onnxruntime), not {device}")
        return OnnxEncoder.load(folder)
    return load_model(folder, device=resolve_device(device))


def rank_and_world() -> tuple[int, int]:
    """RANK / WORLD_SIZE as torchrun sets them; (0, 1) when run directly."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise EmbedError(f"RANK and WORLD_SIZE must be integers: {error}") from None
    if world < 1 or not 0 <= rank < world:
        raise EmbedError(f"invalid RANK={rank} / WORLD_SIZE={world}")
    return rank, world


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _vector_array(vectors: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def vectors_from_column(column: pa.ChunkedArray | pa.Array, dim: int | None = None) -> np.ndarray:
    """A fixed_size_list<float32> column -> (n, dim) float32 (one copy)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = dim or array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def _write_table_atomic(table: pa.Table, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _image_schema(dim: int) -> pa.Schema:
    vec = pa.list_(pa.float32(), dim)
    return pa.schema([("product_id", pa.string()), ("image_index", pa.int32()), ("image_path", pa.string()),
                      ("product_embedding", vec), ("global_embedding", vec)])


def _product_schema(dim: int) -> pa.Schema:
    return pa.schema([("product_id", pa.string()), ("title", pa.string()), ("category", pa.string()),
                      ("attributes", pa.string()), ("image_paths", pa.list_(pa.string())),
                      ("title_embedding", pa.list_(pa.float32(), dim))])


@torch.inference_mode()
def _embed_images(model: ECLIP, slots: list[tuple[Product, int]], batch_size: int, bar) -> tuple[pa.Table, list[dict]]:
    dim = model.config.embed_dim
    rows: dict[str, list] = {"product_id": [], "image_index": [], "image_path": []}
    product_vecs, global_vecs, broken = [], [], []
    for start in range(0, len(slots), batch_size):
        tensors = []
        for product, i in slots[start : start + batch_size]:
            # absolute: the catalog loader joins paths to the catalog's folder as given, which is
            # relative to the working directory when the catalog path is (`--catalog catalog.jsonl`)
            path = os.path.abspath(product.images[i].path)
            try:
                tensors.append(to_uint8_tensor(load_rgb(path), model.image_size))
            except Exception as error:  # PIL raises many types for truncated or corrupt files
                logger.warning("product %s: image %s unreadable (%s): skipped", product.product_id, path, error)
                broken.append({"product_id": product.product_id, "image_path": path, "error": str(error)})
                continue
            rows["product_id"].append(product.product_id)
            rows["image_index"].append(i)
            rows["image_path"].append(path)
        if tensors:
            encoding = model.encode_image(normalize(torch.stack(tensors)))  # moved to the model's device by it
            product_vecs.append(model.product_embedding_from(encoding).float().cpu().numpy())
            global_vecs.append(encoding.global_embedding.float().cpu().numpy())
        if bar is not None:
            bar.update(len(slots[start : start + batch_size]))
    empty = np.zeros((0, dim), np.float32)
    table = pa.Table.from_arrays([
        pa.array(rows["product_id"], pa.string()),
        pa.array(rows["image_index"], pa.int32()),
        pa.array(rows["image_path"], pa.string()),
        _vector_array(np.concatenate(product_vecs) if product_vecs else empty, dim),
        _vector_array(np.concatenate(global_vecs) if global_vecs else empty, dim),
    ], schema=_image_schema(dim))
    return table.replace_schema_metadata({BROKEN_KEY: json.dumps(broken).encode()}), broken


@torch.inference_mode()
def _embed_titles(model: ECLIP, products: list[Product], batch_size: int) -> pa.Table:
    dim = model.config.embed_dim
    vecs = [model.encode_text([p.title for p in products[s : s + batch_size]]).float().cpu().numpy()
            for s in range(0, len(products), batch_size)]
    return pa.Table.from_arrays([
        pa.array([p.product_id for p in products], pa.string()),
        pa.array([p.title for p in products], pa.string()),
        pa.array([p.category for p in products], pa.string()),
        pa.array([json.dumps(p.attributes, ensure_ascii=False, sort_keys=True) for p in products], pa.string()),
        pa.array([[os.path.abspath(im.path) for im in p.images] for p in products], pa.list_(pa.string())),
        _vector_array(np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32), dim),
    ], schema=_product_schema(dim))


def embed_catalog(
    model_folder: str | Path,
    catalog: str | Path,
    out_dir: str | Path,
    part_size: int = PART_SIZE,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    max_parts: int | None = None,
) -> EmbedReport:
    """Embed every image and title of `catalog` with the model in `model_folder` (a model
    folder, or an `eclip export --onnx` folder: then onnxruntime does the work).

    Resumes: parts already in `out_dir` are skipped. `rank`/`world_size` default to the
    RANK/WORLD_SIZE environment (torchrun). `max_parts` stops after writing that many parts
    (a time-boxed job; the next run continues)."""
    from tqdm import tqdm

    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    if part_size < 1 or batch_size < 1:
        raise EmbedError("part_size and batch_size must be positive")
    out = Path(out_dir)
    model_folder = Path(model_folder)
    model = load_encoder(model_folder, device=device)
    products, catalog_report = load_catalog(catalog, check_images=False)  # decoded once, below
    slots = [(p, i) for p in products for i in range(len(p.images))]
    image_parts = -(-len(slots) // part_size)
    product_parts = -(-len(products) // part_size)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "catalog": str(Path(catalog).resolve()), "catalog_sha256": file_sha256(Path(catalog)),
        "image_root": str(Path(catalog).resolve().parent),  # what relative catalog paths are relative to
        "model": str(model_folder.resolve()), "model_sha256": model_fingerprint(model_folder),
        "embed_dim": model.config.embed_dim, "image_size": model.image_size,
        "has_decoder": model.config.has_decoder, "part_size": part_size,
        "backend": "onnx" if is_onnx_export(model_folder) else "torch",
        "image_parts": image_parts, "product_parts": product_parts,
        "images": len(slots), "products": len(products),
        "catalog_skipped": dict(catalog_report.skipped),
    }
    _check_or_write_manifest(out, manifest)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "products").mkdir(parents=True, exist_ok=True)
    for folder in (out / "images", out / "products"):  # leftovers of a killed run
        for stray in folder.glob(".part-*.tmp*"):
            stray.unlink(missing_ok=True)

    jobs = [("images", i) for i in range(image_parts)] + [("products", j) for j in range(product_parts)]
    mine = jobs[rank::world_size]
    report = EmbedReport(out, rank, world_size, parts_total=len(jobs), parts_mine=len(mine),
                         catalog_skipped=Counter(catalog_report.skipped))
    todo = [(kind, i) for kind, i in mine if not (out / kind / _part_name(i)).is_file()]
    report.parts_skipped = len(mine) - len(todo)
    if max_parts is not None:
        todo = todo[:max_parts]
    todo_images = sum(len(slots[i * part_size : (i + 1) * part_size]) for kind, i in todo if kind == "images")
    desc = "embedding" + (f" (rank {rank}/{world_size})" if world_size > 1 else "")
    with tqdm(total=todo_images, desc=desc, unit="img", disable=not progress, position=rank if world_size > 1 else None) as bar:
        for kind, i in todo:
            if kind == "images":
                table, broken = _embed_images(model, slots[i * part_size : (i + 1) * part_size], batch_size, bar)
                report.images_embedded += table.num_rows
                report.broken.extend(broken)
            else:
                table = _embed_titles(model, products[i * part_size : (i + 1) * part_size], batch_size)
            _write_table_atomic(table, out / kind / _part_name(i))
            report.parts_written += 1
    report.complete = all((out / kind / _part_name(i)).is_file() for kind, i in jobs)
    logger.info(report.summary())
    return report


def _check_or_write_manifest(out: Path, manifest: dict) -> None:
    path = out / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("format", "version", "catalog_sha256", "model_sha256", "part_size"):
            if old.get(key) != manifest[key]:
                raise EmbedError(
                    f"{out} holds embeddings of another run ({key} differs: {old.get(key)!r} != {manifest[key]!r}); "
                    "give a new --out folder or delete this one")
        return
    # (another rank's temporary manifest is not foreign content)
    if out.exists() and any(not p.name.startswith(".manifest.json") for p in out.iterdir()):
        if path.is_file():  # another rank wrote it since the first look: compare with it
            return _check_or_write_manifest(out, manifest)
        raise EmbedError(f"{out} exists and is not an embeddings folder (no manifest.json); give a new --out folder")
    # every rank may get here at once: they write the same content, each atomically
    atomic_write_text(path, json.dumps(manifest, indent=2))


@dataclass
class Embeddings:
    """A complete embeddings folder, read back."""

    manifest: dict
    images: pa.Table  # one row per embedded image
    products: pa.Table  # one row per product
    broken: list[dict]

    def vectors(self, field: str = "product") -> np.ndarray:
        if field not in FIELDS:
            raise ValueError(f"unknown field {field!r}; choose from {', '.join(FIELDS)}")
        return vectors_from_column(self.images.column(FIELDS[field]), self.manifest["embed_dim"])

    def row_metadata(self) -> tuple[list[str], list[dict]]:
        """Product id and metadata of every image row, for `ProductIndex.build`."""
        info = {}
        for pid, title, category, attributes in zip(*(self.products.column(c).to_pylist() for c in ("product_id", "title", "category", "attributes"))):
            info[pid] = {"title": title, "category": category, "attributes": json.loads(attributes)}
        pids = self.images.column("product_id").to_pylist()
        paths = self.images.column("image_path").to_pylist()
        return pids, [info[p] | {"image_path": path} for p, path in zip(pids, paths)]


def load_embeddings(folder: str | Path) -> Embeddings:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise EmbedError(f"{folder} is not an embeddings folder (no manifest.json; make one with `eclip embed`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise EmbedError(f"{path} is not an eclip embeddings manifest")
    expected = {"images": manifest["image_parts"], "products": manifest["product_parts"]}
    missing = [f"{kind}/{_part_name(i)}" for kind, n in expected.items() for i in range(n) if not (folder / kind / _part_name(i)).is_file()]
    if missing:
        raise EmbedError(f"{folder} is incomplete: {len(missing)} part(s) missing (e.g. {missing[0]}); rerun `eclip embed` with the same arguments to finish it")
    dim = manifest["embed_dim"]
    tables = {kind: [pq.read_table(folder / kind / _part_name(i)) for i in range(n)] for kind, n in expected.items()}
    broken = []
    for table in tables["images"]:
        meta = table.schema.metadata or {}
        broken.extend(json.loads(meta.get(BROKEN_KEY, b"[]")))
    images = pa.concat_tables([t.replace_schema_metadata(None) for t in tables["images"]]) if tables["images"] else _image_schema(dim).empty_table()
    products = pa.concat_tables(tables["products"]) if tables["products"] else _product_schema(dim).empty_table()
    return Embeddings(manifest, images, products, broken)


def index_embeddings(
    folder: str | Path, kind: str = "auto", memory_budget_mb: float | None = None, field: str = "product"
):
    """Build a ProductIndex over the image vectors of an embeddings folder (`eclip index`);
    `memory_budget_mb` None: the index's default (`DEFAULT_MEMORY_BUDGET_MB`)."""
    from .index import DEFAULT_MEMORY_BUDGET_MB, ProductIndex

    memory_budget_mb = DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb

    embeddings = load_embeddings(folder)
    if embeddings.images.num_rows == 0:
        raise EmbedError(f"{folder} holds no image embedding (every image broken?)")
    vectors = embeddings.vectors(field)
    product_ids, metadata = embeddings.row_metadata()
    manifest = embeddings.manifest
    image_root = Path(manifest.get("image_root") or Path(manifest["catalog"]).parent)
    _absolute_image_paths(metadata, image_root)
    info = {"field": field, "embeddings": str(Path(folder).resolve()), "model": manifest["model"],
            "model_sha256": manifest["model_sha256"], "catalog": manifest["catalog"], "image_root": str(image_root)}
    return ProductIndex.build(vectors, product_ids, metadata, kind=kind, memory_budget_mb=memory_budget_mb, info=info)


def _absolute_image_paths(metadata: list[dict], image_root: Path) -> None:
    """Embeddings folders written before image paths were stored absolute hold them relative to
    the working directory of `eclip embed`, which was the catalog's folder or one above it: the
    first of those under which the first relative path exists becomes their base (in place)."""
    relative = [m for m in metadata if m.get("image_path") and not os.path.isabs(m["image_path"])]
    if not relative:
        return
    first = relative[0]["image_path"]
    base = next((b for b in (image_root, *image_root.parents) if (b / first).is_file()), None)
    if base is None:
        logger.warning("image %s is not under %s or a folder above it: relative image paths kept as they are", first, image_root)
        return
    for meta in relative:
        meta["image_path"] = str(base / meta["image_path"])
