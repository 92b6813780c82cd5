"""Product search: embed (Parquet parts, resumption, rank split), the FAISS product index (kinds,
updates by id, save/load), the Searcher and the `eclip embed / index / search` commands."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from eclip.io import save_model  # noqa: E402
from eclip.model.eclip import ECLIP  # noqa: E402
from eclip_app.cli import main  # noqa: E402
from eclip_app.search import embed as embed_module  # noqa: E402
from eclip_app.search.embed import EmbedError, embed_catalog, index_embeddings, load_embeddings  # noqa: E402
from eclip_app.search.index import IndexFolderError, ProductIndex, choose_kind  # noqa: E402
from eclip_app.search.searcher import Searcher  # noqa: E402

from .conftest import micro_config  # noqa: E402

PART = 50  # 60 products x 3 images = 180 images -> 4 image parts + 2 product parts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(ECLIP(micro_config()).eval(), tmp_path_factory.mktemp("search_model") / "model")


@pytest.fixture(scope="module")
def embedded(model_dir, synth_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "one_run"
    report = embed_catalog(model_dir, synth_catalog["all"], out, part_size=PART, batch_size=32, progress=False, rank=0, world_size=1)
    assert report.complete and report.parts_written == report.parts_total == 6
    return out


@pytest.fixture(scope="module")
def index_dir(embedded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx") / "index"
    index_embeddings(embedded, kind="flat").save(folder)
    return folder


def _same_embeddings(a, b) -> None:
    ea, eb = load_embeddings(a), load_embeddings(b)
    for table in ("images", "products"):
        ta, tb = getattr(ea, table), getattr(eb, table)
        assert ta.column_names == tb.column_names and ta.num_rows == tb.num_rows
        for name in ta.column_names:
            assert ta.column(name).to_pylist() == tb.column(name).to_pylist(), f"{table}.{name} differs"


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- embed


def test_embed_writes_unit_vectors_per_image_and_title(embedded, synth_catalog):
    emb = load_embeddings(embedded)
    assert emb.images.num_rows == 180 and emb.products.num_rows == 60 and emb.broken == []
    assert {"product_id", "image_index", "image_path", "product_embedding", "global_embedding"} <= set(emb.images.column_names)
    assert {"product_id", "title", "category", "attributes", "image_paths", "title_embedding"} <= set(emb.products.column_names)
    for field in ("product", "global"):
        vectors = emb.vectors(field)
        assert vectors.shape == (180, 16) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb.vectors("product"), emb.vectors("global"))
    assert json.loads(emb.products.column("attributes")[0].as_py())["colour"]
    assert emb.manifest["images"] == 180 and emb.manifest["part_size"] == PART


def test_embed_resumes_after_a_kill_with_the_same_result(embedded, model_dir, synth_catalog, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    # a time-boxed first run: two parts, then stop
    first = embed_catalog(model_dir, synth_catalog["all"], out, part_size=PART, batch_size=32, progress=False, rank=0, world_size=1, max_parts=2)
    assert first.parts_written == 2 and not first.complete
    with pytest.raises(EmbedError, match="incomplete"):
        load_embeddings(out)
    # a "kill" in the middle of the next image part: the exception escapes like SIGKILL would,
    # leaving a half-written temporary file behind
    real = embed_module._embed_images
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            (out / "images" / ".part-00003.parquet.tmpdead").write_bytes(b"half a parquet file")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_embed_images", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_catalog(model_dir, synth_catalog["all"], out, part_size=PART, batch_size=32, progress=False, rank=0, world_size=1)
    monkeypatch.setattr(embed_module, "_embed_images", real)
    done = sorted(p.name for p in (out / "images").glob("part-*.parquet"))
    assert done == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    last = embed_catalog(model_dir, synth_catalog["all"], out, part_size=PART, batch_size=32, progress=False, rank=0, world_size=1)
    assert last.complete and last.parts_skipped == 3 and last.parts_written == 3
    assert not list(out.rglob(".part-*"))  # the stray temporary file is gone
    _same_embeddings(out, embedded)


def test_rank_split_union_equals_single_process(embedded, model_dir, synth_catalog, tmp_path, monkeypatch):
    out = tmp_path / "ranks"
    written = []
    for rank in (0, 1):  # as torchrun would set them, one process after the other
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        report = embed_catalog(model_dir, synth_catalog["all"], out, part_size=PART, batch_size=32, progress=False)
        assert (report.rank, report.world_size) == (rank, 2)
        written.append(report.parts_written)
    assert written == [3, 3] and report.complete
    _same_embeddings(out, embedded)


def test_embed_refuses_another_runs_folder(embedded, model_dir, synth_catalog, tmp_path):
    with pytest.raises(EmbedError, match="part_size"):
        embed_catalog(model_dir, synth_catalog["all"], embedded, part_size=PART + 1, progress=False, rank=0, world_size=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(EmbedError, match="not an embeddings folder"):
        embed_catalog(model_dir, synth_catalog["all"], foreign, progress=False, rank=0, world_size=1)
    with pytest.raises(EmbedError, match="no manifest"):
        load_embeddings(tmp_path)


def test_broken_image_is_skipped_counted_and_reported(model_dir, synth_catalog, tmp_path, capsys):
    lines = synth_catalog["all"].read_text().splitlines()[:4]
    root = synth_catalog["all"].parent
    records = [json.loads(line) for line in lines]
    for record in records:
        for image in record["images"]:
            image["path"] = str(root / image["path"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    records[1]["images"][0] = str(broken)  # no box: only embedding decodes it
    records[2]["images"][0]["path"] = str(broken)  # with a box: the catalog loader decodes it
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["-q", "embed", "--model", str(model_dir), "--catalog", str(catalog), "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "1 broken image(s) skipped" in captured.out and "broken.png" in captured.err
    assert "catalog loader skipped 1 unreadable image" in captured.out
    emb = load_embeddings(tmp_path / "emb")
    assert emb.images.num_rows == 10 and len(emb.broken) == 1 and emb.products.num_rows == 4


# ----------------------------------------------------------------------------- index


def test_flat_index_equals_brute_force_max_over_images(embedded):
    emb = load_embeddings(embedded)
    index = index_embeddings(embedded, kind="flat")
    assert index.kind == "flat" and len(index) == 60 and index.num_vectors == 180
    vectors = emb.vectors("product")
    pids = np.array(emb.images.column("product_id").to_pylist())
    queries = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for q, got in zip(queries, index.search(queries, k=7)):
        scores = vectors @ q
        best = {p: scores[pids == p].max() for p in set(pids.tolist())}
        expected = sorted(best.items(), key=lambda item: -item[1])[:7]
        assert [p for p, _ in got] == [p for p, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
    # every image finds its own product first, through the Searcher path too
    own = index.search(vectors, k=1)
    assert [hits[0][0] for hits in own] == pids.tolist()


def _toy(n_products: int = 40, images: int = 2, dim: int = 16, seed: int = 0):
    x = clustered(n_products * images, dim, 8, seed)
    pids = [f"p{i // images}" for i in range(len(x))]
    meta = [{"title": f"title {i // images}", "image_path": f"/img/{i}.png"} for i in range(len(x))]
    return x, pids, meta


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_update_delete_by_id(kind):
    x, pids, meta = _toy()
    index = ProductIndex.build(x, pids, meta, kind=kind)
    assert index.kind == kind and len(index) == 40
    assert index.search(x[:1], 1)[0][0][0] == "p0"
    assert index.metadata("p0") == {"title": "title 0", "image_paths": ["/img/0.png", "/img/1.png"]}

    # delete: p0 no longer appears, its neighbour comes first
    assert index.remove(["p0", "nope"]) == 1 and len(index) == 39 and "p0" not in index
    hits = index.search(x[:2], 10)
    assert all(pid != "p0" for row in hits for pid, _ in row) and len(hits[0]) == 10
    with pytest.raises(KeyError):
        index.metadata("p0")

    # add a new product exactly where the query is
    query = clustered(1, 16, 1, seed=9)
    index.add(query, ["new"], [{"title": "new one", "image_path": "/img/new.png"}])
    top = index.search_hits(query, 1)[0][0]
    assert (top.product_id, top.image_path) == ("new", "/img/new.png") and top.score == pytest.approx(1.0, abs=1e-5)

    # update p5 (two images -> one, somewhere else): the old vectors stop matching it
    old_vector = x[10:11]
    assert index.search(old_vector, 1)[0][0][0] == "p5"
    index.add(-old_vector, ["p5"], [{"title": "moved", "image_path": "/img/moved.png"}])
    assert index.search(old_vector, 1)[0][0][0] != "p5"
    assert index.search(-old_vector, 1)[0][0][0] == "p5"
    assert index.metadata("p5")["image_paths"] == ["/img/moved.png"] and len(index) == 40
    assert index.num_vectors == 40 * 2 - 2 + 1 - 2 + 1

    # removing most products: HNSW compacts its tombstones, results stay right
    index.remove([f"p{i}" for i in range(1, 35)])
    assert len(index) == 6 and index.num_tombstones == 0 and index.num_vectors == 11
    remaining = {pid for pid, _ in index.search(x[:1], 10)[0]}
    assert remaining == {"new", "p35", "p36", "p37", "p38", "p39"}


def assert_same_hits(found, expected, atol: float = 1e-5) -> None:
    """The same products in the same order, scores equal up to float rounding (HNSW's SIMD
    inner products round differently from numpy's)."""
    assert [[p for p, _ in row] for row in found] == [[p for p, _ in row] for row in expected]
    np.testing.assert_allclose([s for row in found for _, s in row], [s for row in expected for _, s in row], atol=atol)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_one_vector_per_product_fast_path_keeps_every_guarantee(kind):
    """With one live vector per product the index fetches exactly k vectors; after a removal
    (a tombstone in HNSW) or a second photo it falls back to fetching more: both give the exact
    distinct top-k, and a query is normalised and checked the same way alone or in a batch."""
    x, pids, meta = _toy(n_products=300, images=1, dim=16)
    index = ProductIndex.build(x, pids, meta, kind=kind)
    exact = ProductIndex.build(x, pids, meta, kind="flat")
    queries = clustered(5, 16, 3, seed=4)
    assert_same_hits(index.search(queries, 10), exact.search(queries, 10))
    one = [index.search(3.0 * q[None], 10)[0] for q in queries]  # not unit length: normalised
    assert_same_hits(one, exact.search(queries, 10))
    hits = index.search_hits(queries[:1], 3)[0]
    assert [(h.product_id, h.image_path) for h in hits] == [(p, f"/img/{int(p[1:])}.png") for p, _ in exact.search(queries[:1], 3)[0]]

    index.remove(["p0", "p1"])
    index.add(x[7:8] * -1, ["p7b"], [{"image_path": "/img/7b.png"}])
    index.add(x[8:9], ["p9"], [{"image_path": "/img/9b.png"}])  # p9 replaced by a copy of p8's photo
    everything = index.search(queries[:2], 400)
    assert all(len(r) == 299 and len({p for p, _ in r}) == 299 and not {"p0", "p1"} & {p for p, _ in r} for r in everything)
    for bad in (np.full((1, 16), np.nan, np.float32), np.array([[np.inf] + [0.0] * 15], np.float32)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            index.search(bad, 3)
        with pytest.raises(ValueError, match="NaN or infinite"):
            index.search(np.concatenate([queries[:2], bad]), 3)


def test_concurrent_searches_and_updates():
    """A web service searches from several threads while products are updated."""
    import threading

    x, pids, meta = _toy(n_products=200, images=1)
    index = ProductIndex.build(x, pids, meta, kind="hnsw")
    errors: list[BaseException] = []

    def reader():
        try:
            for i in range(150):
                hits = index.search(x[i % 200 : i % 200 + 1], 5)[0]
                assert len(hits) == 5 and len({p for p, _ in hits}) == 5
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(60):
        index.remove([f"p{i}"])
        index.add(x[i : i + 1], [f"p{i}"], [{"title": "again"}])
    for t in threads:
        t.join()
    assert not errors and len(index) == 200 and index.metadata("p3")["title"] == "again"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip_is_identical(kind, tmp_path):
    x, pids, meta = _toy(n_products=400, images=1, dim=16)
    index = ProductIndex.build(x, pids, meta, kind=kind, info={"field": "product"})
    index.remove(["p3"])
    folder = tmp_path / "index"
    index.save(folder)
    index.save(folder)  # over an existing index: replaced whole
    loaded = ProductIndex.load(folder)
    assert (loaded.kind, loaded.dim, len(loaded), loaded.info) == (kind, 16, 399, {"field": "product"})
    queries = x[:20]
    assert loaded.search(queries, 5) == index.search(queries, 5)
    assert loaded.metadata("p7") == index.metadata("p7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folder left
    # the loaded index is still updatable
    loaded.add(x[3:4], ["p3"], [{"title": "back"}])
    assert loaded.search(x[3:4], 1)[0][0][0] == "p3"


def test_auto_kind_by_size_and_budget():
    assert choose_kind(1_000, 512)[0] == "flat"
    assert choose_kind(49_999, 512)[0] == "flat"
    assert choose_kind(100_000, 512, 1024)[0] == "hnsw"
    assert choose_kind(1_000_000, 512, 4096)[0] == "hnsw"
    assert choose_kind(1_000_000, 512)[0] == "hnsw"  # the default 4 GiB budget
    assert choose_kind(2_000_000, 512)[0] == "ivfpq"
    from eclip_app.cli import build_parser
    from eclip_app.search.index import DEFAULT_MEMORY_BUDGET_MB

    # the CLI cannot import the index module (faiss) to build its parser: same number, by hand
    assert build_parser().parse_args(["index", "--embeddings", "e", "--out", "o"]).memory_budget_mb == DEFAULT_MEMORY_BUDGET_MB
    kind, params = choose_kind(1_000_000, 512, 1024)
    assert kind == "ivfpq" and params["pq_m"] == 128
    assert choose_kind(1_000_000, 512, 40)[1]["pq_m"] < 64
    assert choose_kind(10_000, 512, 4)[0] == "ivfpq"  # flat (20 MB) and HNSW do not fit 4 MB
    with pytest.raises(ValueError, match="do not fit"):
        choose_kind(10_000_000, 512, 1)
    x, pids, meta = _toy()
    assert ProductIndex.build(x, pids, meta).kind == "flat"


def test_hnsw_recall_against_flat_on_clustered_data():
    x = clustered(6000, 64, 50, seed=1)
    base, queries = x[:5000], x[5000:5200]
    pids = [str(i) for i in range(5000)]
    meta = [{}] * 5000
    flat = ProductIndex.build(base, pids, meta, kind="flat")
    hnsw = ProductIndex.build(base, pids, meta, kind="hnsw")
    truth = flat.search(queries, 10)
    got = hnsw.search(queries, 10)
    recall = np.mean([len({p for p, _ in a} & {p for p, _ in b}) / 10 for a, b in zip(truth, got)])
    assert recall >= 0.9, recall


def test_index_input_errors(tmp_path):
    x, pids, meta = _toy()
    index = ProductIndex.build(x, pids, meta, kind="flat")
    with pytest.raises(ValueError, match="dimension 8 but the index has dimension 16"):
        index.search(np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="same length"):
        index.add(x[:2], ["a"], [{}, {}])
    with pytest.raises(ValueError, match="unknown index kind"):
        ProductIndex.build(x, pids, meta, kind="annoy")
    with pytest.raises(IndexFolderError, match="does not exist"):
        ProductIndex.load(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "index.json").write_text("{}")
    with pytest.raises(IndexFolderError, match="missing index.faiss"):
        ProductIndex.load(tmp_path / "half")


def _saved(tmp_path, name="index", kind="flat", n_products=40, seed=0):
    x, pids, meta = _toy(n_products=n_products, seed=seed)
    folder = tmp_path / name
    ProductIndex.build(x, pids, meta, kind=kind).save(folder)
    return folder


def _drop_fingerprint(folder) -> None:
    """Make `folder` look like one saved before index.json held the files' sizes and SHA-256."""
    header = json.loads((folder / "index.json").read_text())
    header.pop("files", None)
    (folder / "index.json").write_text(json.dumps(header))


def _without_product_row(folder, pid: str) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "products.parquet")
    pq.write_table(table.filter(pc.not_equal(table.column("product_id"), pid)), folder / "products.parquet")


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fingerprint", [True, False], ids=["fingerprinted", "old-folder"])
@pytest.mark.parametrize(
    ("damage", "with_fingerprint", "without_fingerprint"),
    [
        # an index.faiss of another index of the same kind and dimension, 30 products instead of 40
        ("foreign_faiss", "index.faiss is .* bytes", "index.faiss holds 60 vectors"),
        ("missing_product_row", "products.parquet is .* bytes", "no row for product 'p7'"),
        ("truncated_faiss", "index.faiss is .* bytes", "index.faiss is not a readable FAISS index"),
        ("truncated_vectors", "vectors.parquet is .* bytes", "vectors.parquet is not a readable Parquet file"),
        ("truncated_products", "products.parquet is .* bytes", "products.parquet is not a readable Parquet file"),
        ("same_size_other_bytes", "index.faiss does not match the checksum", None),
        ("missing_vectors", "missing vectors.parquet", "missing vectors.parquet"),
        ("truncated_header", "index.json is not valid JSON", "index.json is not valid JSON"),
    ],
)
def test_index_folder_parts_must_agree(tmp_path, damage, with_fingerprint, without_fingerprint, fingerprint):
    folder = _saved(tmp_path)
    assert len(ProductIndex.load(folder)) == 40
    if not fingerprint:
        _drop_fingerprint(folder)
        assert len(ProductIndex.load(folder)) == 40  # an old folder still loads
    expected = with_fingerprint if fingerprint else without_fingerprint
    if damage == "foreign_faiss":
        other = _saved(tmp_path, "other", n_products=30, seed=1)
        (folder / "index.faiss").write_bytes((other / "index.faiss").read_bytes())
    elif damage == "missing_product_row":
        _without_product_row(folder, "p7")
    elif damage.startswith("truncated_"):
        name = {"faiss": "index.faiss", "vectors": "vectors.parquet", "products": "products.parquet",
                "header": "index.json"}[damage.split("_")[1]]
        _truncate(folder / name)
    elif damage == "same_size_other_bytes":
        data = bytearray((folder / "index.faiss").read_bytes())
        data[len(data) // 2] ^= 0xFF  # one vector component changed (the ids sit at the end)
        (folder / "index.faiss").write_bytes(bytes(data))
    elif damage == "missing_vectors":
        (folder / "vectors.parquet").unlink()
    if expected is None:  # only the fingerprint can tell: an old folder loads the changed vector
        assert len(ProductIndex.load(folder)) == 40
        return
    with pytest.raises(IndexFolderError, match=expected):
        ProductIndex.load(folder)


def test_index_folder_checks_without_hashing_and_for_every_kind(tmp_path):
    for kind in ("flat", "hnsw", "ivfpq"):
        folder = _saved(tmp_path, kind, kind=kind, n_products=80)
        _drop_fingerprint(folder)
        _without_product_row(folder, "p3")
        with pytest.raises(IndexFolderError, match="no row for product 'p3'"):
            ProductIndex.load(folder)
    # a kind's FAISS file under another kind's header; a count that disagrees with index.json
    flat, hnsw = tmp_path / "flat", _saved(tmp_path, "hnsw2", kind="hnsw", n_products=80)
    (flat / "index.faiss").write_bytes((hnsw / "index.faiss").read_bytes())
    _drop_fingerprint(flat)
    with pytest.raises(IndexFolderError, match="index.faiss is a IndexHNSWFlat, a 'flat' index is a IndexIDMap"):
        ProductIndex.load(flat)
    folder = _saved(tmp_path, "counts")
    header = json.loads((folder / "index.json").read_text())
    header["products"] = 41
    (folder / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFolderError, match="products.parquet has 40 rows, index.json says 41"):
        ProductIndex.load(folder, verify=False)


def test_cli_serve_and_search_refuse_a_damaged_index(model_dir, tmp_path, capsys):
    folder = _saved(tmp_path)
    _truncate(folder / "index.faiss")
    for command in ("serve", "search"):
        extra = ["--text", "x"] if command == "search" else ["--port", "1"]
        assert main(["-q", command, "--model", str(model_dir), "--index", str(folder), *extra]) == 1
        err = capsys.readouterr().err
        assert f"eclip {command}: {folder}: index.faiss is" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- searcher and CLI


def test_searcher_text_image_and_grounding(model_dir, index_dir, synth_catalog):
    from PIL import Image

    searcher = Searcher.load(model_dir, index_dir)
    rows = searcher.search_text("red striped tee", k=5)
    assert [r.rank for r in rows] == [1, 2, 3, 4, 5] and len({r.product_id for r in rows}) == 5
    assert all(r.title and r.image_path for r in rows)
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    # a catalog image as the query finds its own product first (its vector is in the index)
    record = json.loads(synth_catalog["all"].read_text().splitlines()[7])
    photo = Image.open(synth_catalog["all"].parent / record["images"][1]["path"])
    top = searcher.search_image(photo, k=3)[0]
    assert top.product_id == record["product_id"] and top.score == pytest.approx(1.0, abs=1e-4)
    assert top.image_path.endswith(record["images"][1]["path"].split("/")[-1])
    both = searcher.search_image_text(photo, record["title"], k=3)
    assert len(both) == 3
    grounded = searcher.ground(photo, record["title"])
    x0, y0, x1, y1 = grounded.box_pixels
    assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height
    assert grounded.heatmap.shape == (photo.height, photo.width)  # at the photo's own resolution


def test_searcher_tiles(model_dir, index_dir, synth_catalog):
    """A tiled image query: one vector per tile, merged by each product's best match; the whole
    photo is tile 0, so the photo's own product still comes first; grounding stays in a tile."""
    from PIL import Image

    searcher = Searcher.load(model_dir, index_dir)
    record = json.loads(synth_catalog["all"].read_text().splitlines()[7])
    photo = Image.open(synth_catalog["all"].parent / record["images"][1]["path"])
    vectors = searcher.embed_image(photo, tiles=2)
    assert vectors.shape == (5, searcher.index.dim)
    assert np.allclose(vectors[0], searcher.embed_image(photo), atol=1e-5)
    rows = searcher.search_image(photo, k=4, tiles=2)
    assert [r.rank for r in rows] == [1, 2, 3, 4] and len({r.product_id for r in rows}) == 4
    assert rows[0].product_id == record["product_id"] and rows[0].score == pytest.approx(1.0, abs=1e-4)
    # each product's score is its best match over the five vectors
    by_vector = searcher.index.search(vectors, k=len(searcher.index))
    best = {}
    for hits in by_vector:
        for pid, score in hits:
            best[pid] = max(best.get(pid, -2.0), score)
    for row in rows:
        assert row.score == pytest.approx(best[row.product_id], abs=1e-5)
    assert len(searcher.search_image_text(photo, record["title"], k=3, tiles=2)) == 3
    grounded = searcher.ground(photo, record["title"], tiles=2)
    x0, y0, x1, y1 = grounded.box_pixels
    assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height


def test_cli_embed_index_search_prints_tables(model_dir, synth_catalog, tmp_path, capsys):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["-q", "embed", "--model", str(model_dir), "--catalog", str(synth_catalog["heldout"]), "--out", str(emb), "--no-progress"]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["-q", "index", "--embeddings", str(emb), "--out", str(idx)]) == 0
    assert "flat index" in capsys.readouterr().out

    assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", "blue bag", "-k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["rank", "score", "product_id", "title"] and len(lines) == 2 + 4

    image = json.loads(synth_catalog["heldout"].read_text().splitlines()[0])["images"][0]["path"]
    image = synth_catalog["heldout"].parent / image
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", "blue bag", "--image", str(image), "-k", "3", "--ground"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "box" in lines[0] and len(lines) == 2 + 3
    for line in lines[2:]:
        box = [int(v) for v in line.split()[-1].split(",")]
        assert len(box) == 4 and box[0] < box[2] and box[1] < box[3]

    assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--image", str(image), "-k", "2", "--ground", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and len(rows[0]["box"]) == 4 and rows[0]["rank"] == 1

    # filters, modes and facet counts
    index = ProductIndex.load(idx)
    category = index.metadata(index.product_ids()[0])["category"]
    members = {p for p in index.product_ids() if index.metadata(p)["category"] == category}
    for mode in ("dense", "lexical", "hybrid"):
        assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", f"blue {category}", "-k", "50",
                     "--mode", mode, "--filter", f"category={category.upper()}", "--facets", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {r["product_id"] for r in out["results"]} <= members and out["results"], mode
        assert out["facets"]["category"] == index.facet_counts()["category"]
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", "bag", "--filter", "category"]) == 2
    assert "bad filter 'category'" in capsys.readouterr().err
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--image", str(image), "--mode", "lexical"]) == 2
    assert "--mode lexical needs --text" in capsys.readouterr().err
    dense = main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", "blue bag", "-k", "5", "--json"])
    dense_rows = json.loads(capsys.readouterr().out)
    assert dense == 0 and main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", "blue bag", "-k", "5",
                                "--mode", "hybrid", "--dense-weight", "100", "--json"]) == 0
    assert [r["product_id"] for r in json.loads(capsys.readouterr().out)] == [r["product_id"] for r in dense_rows]
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(idx), "--text", "bag", "--mode", "hybrid", "--dense-weight", "0"]) == 2
    assert "--dense-weight must be a number between 0.001 and 1000" in capsys.readouterr().err


def test_cli_bad_inputs_give_clear_errors(model_dir, index_dir, tmp_path, capsys):
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(tmp_path / "nope"), "--text", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(index_dir)]) == 2
    assert "give --text, --image or both" in capsys.readouterr().err
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(index_dir), "--image", str(tmp_path / "no.png")]) == 2
    assert "cannot read the query image" in capsys.readouterr().err
    # an index from a 16-d model searched with an 8-d model
    other = save_model(ECLIP(dataclasses.replace(micro_config(), embed_dim=8)), tmp_path / "other")
    assert main(["-q", "search", "--model", str(other), "--index", str(index_dir), "--text", "x"]) == 1
    assert "16-d vectors but the model embeds into 8-d" in capsys.readouterr().err
    assert main(["-q", "index", "--embeddings", str(tmp_path), "--out", str(tmp_path / "i2")]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_index_load_finishes_a_replace_cut_short(index_dir, tmp_path):
    """A kill between `X -> .X.old` and `.X.new -> X` leaves no index folder; the next load
    finishes the swap (the new content) instead of failing."""
    import shutil

    old = ProductIndex.load(index_dir)
    target = tmp_path / "index"
    shutil.copytree(index_dir, target)
    new = ProductIndex.load(index_dir)
    first = old.product_ids()[0]
    new.remove([first])
    new.save(tmp_path / ".index.new")  # step 2 done: the new content is complete
    target.rename(tmp_path / ".index.old")  # step 3 done, killed before step 4
    loaded = ProductIndex.load(target)
    assert len(loaded) == len(old) - 1 and first not in loaded.product_ids()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
