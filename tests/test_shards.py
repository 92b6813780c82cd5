"""WebDataset shards: writer limits and round trip, and a stream that yields map-style batches.

Images are stored as the catalog's own bytes unless `image_size` asks for a re-encode, so the
round trip is checked exactly (same bytes, same decoded pixels as ImageStore); the re-encoded
JPEG path is checked with a tolerance."""

import dataclasses
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch
from PIL import Image

from eclip.data import ImageStore, PKSampler, collate, load_catalog
from eclip.data.augmentation import augmentation_generator
from eclip.data.shards import (
    INDEX_NAME,
    ShardStream,
    StreamConfig,
    decode_image,
    generate_batches,
    merge_shards,
    read_shard,
    write_shards,
)
from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor
from eclip_app.cli import main
from eclip_app.training.data import MapBatchSource, make_batch, make_batch_source

S = 32  # image side streamed in these tests


@pytest.fixture(scope="module")
def catalog(synth_catalog):
    products, _ = load_catalog(synth_catalog["train"])
    return synth_catalog["train"], products


@pytest.fixture(scope="module")
def shard_dir(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    report = write_shards(catalog[0], out, max_count=7)
    return out, report


def _all_samples(folder: Path):
    return [s for path in sorted(folder.glob("shard-*.tar")) for s in read_shard(str(path))]


def test_count_limit_index_and_every_product_once(catalog, shard_dir):
    _, products = catalog
    out, report = shard_dir
    index = json.loads((out / INDEX_NAME).read_text())
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([INDEX_NAME] + [f"shard-{i:06d}.tar" for i in range(len(index["shards"]))])  # no temporary files left
    assert index["products"] == report.products == len(products)
    assert index["images"] == sum(len(p.images) for p in products)
    counts = [len(list(read_shard(str(out / s["name"])))) for s in index["shards"]]
    assert counts == [s["samples"] for s in index["shards"]]
    assert max(counts) == 7 and sum(counts) == len(products)
    ids = Counter(s.product_id for s in _all_samples(out))
    assert ids == Counter(p.product_id for p in products)  # every product exactly once


def test_size_limit_is_the_file_size(catalog, tmp_path):
    _, products = catalog
    report = write_shards(catalog[0], tmp_path, max_size_mb=0.05)
    sizes = [(tmp_path / s["name"]).stat().st_size for s in report.shards]
    assert len(sizes) > 2 and max(sizes) <= 50_000
    assert sizes == [s["bytes"] for s in report.shards]
    assert sum(s["samples"] for s in report.shards) == len(products)
    # a smaller re-sharding into the same folder leaves no stale shard behind
    write_shards(catalog[0], tmp_path, max_count=1000)
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == ["shard-000000.tar"]


def test_broken_catalog_images_are_skipped(tmp_path):
    Image.new("RGB", (16, 12), (200, 10, 10)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines = [
        {"product_id": "a", "title": "red tee", "images": ["broken.jpg"]},
        {"product_id": "b/2", "title": "red cap", "images": ["broken.jpg", "good.png"]},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = write_shards(tmp_path / "c.jsonl", tmp_path / "out", max_count=5)
    assert (report.products, report.images) == (1, 1)
    assert report.skipped["unreadable image"] == 2 and report.skipped["no usable image"] == 1
    (sample,) = read_shard(str(tmp_path / "out" / "shard-000000.tar"))
    assert sample.product_id == "b/2" and "/" not in sample.key and sample.index == 0
    assert sample.images == [(tmp_path / "good.png").read_bytes()]


def test_round_trip_is_exact(catalog, shard_dir):
    _, products = catalog
    out, _ = shard_dir
    store = ImageStore(products, S)
    samples = _all_samples(out)
    for sample in samples:
        product = products[sample.index]
        assert sample.product_id == product.product_id
        assert (sample.title, sample.category, sample.attributes) == (product.title, product.category, product.attributes)
        assert sample.boxes == [image.box for image in product.images]
        assert [Path(image.path).read_bytes() for image in product.images] == sample.images
    sample = samples[0]
    for i in range(len(sample.images)):
        assert torch.equal(decode_image(sample.images[i], S), store.get(sample.index, i))


def test_reencoded_images_are_close(catalog, tmp_path):
    _, products = catalog
    write_shards(catalog[0], tmp_path, max_count=1000, image_size=S)
    sample = next(read_shard(str(tmp_path / "shard-000000.tar")))
    for data, image in zip(sample.images, products[sample.index].images):
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == "JPEG" and decoded.size == (S, S)
        error = (decode_image(data, S).float() - to_uint8_tensor(load_rgb(image.path), S).float()).abs().mean()
        assert error < 6, error  # JPEG at quality 90, 4:4:4, 32 px: about 3.5 levels of 255


def _check_batch(batch, reference, products, p, k):
    assert [f.name for f in dataclasses.fields(batch)] == [f.name for f in dataclasses.fields(reference)]
    for name in ("images", "image_pids", "text_pids"):
        got, want = getattr(batch, name), getattr(reference, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
    assert isinstance(batch.titles, list) and len(batch.titles) == len(reference.titles) == p
    pids = batch.text_pids.tolist()
    assert len(set(pids)) == p  # P distinct products
    assert batch.image_pids.tolist() == [pid for pid in pids for _ in range(k)]  # K images each, grouped
    assert batch.titles == [products[pid].title for pid in pids]


def test_stream_batch_has_the_map_style_structure(catalog, shard_dir):
    _, products = catalog
    out, _ = shard_dir
    p, k = 6, 4  # K=4 > 3 images a product: the augmented-repeat path too
    store = ImageStore(products, S)
    reference = collate(store, PKSampler([len(x.images) for x in products], p, k, 0).batch(0), torch.Generator().manual_seed(0))
    stream = ShardStream(str(out), p, k, S, seed=0, shuffle_buffer=16)
    assert stream.products == len(products) and stream.batches_per_epoch == len(products) // p
    for step in range(3):
        batch = stream.next_batch(step)
        _check_batch(batch, reference, products, p, k)
        for j, pid in enumerate(batch.text_pids.tolist()):
            # the product's own 3 images come first, pixel for pixel those of the map-style store
            own = {tuple(normalize(store.get(pid, i)).flatten().tolist()[:64]) for i in range(3)}
            for row in range(j * k, j * k + 3):
                assert tuple(batch.images[row].flatten().tolist()[:64]) in own
    assert stream.skipped == Counter()


def test_seeds_ranks_and_resume(shard_dir):
    out, _ = shard_dir

    def pids(stream, steps):
        return [stream.next_batch(s).text_pids.tolist() for s in steps]

    first = pids(ShardStream(str(out), 4, 2, S, seed=0, shuffle_buffer=8), range(3))
    assert first == pids(ShardStream(str(out), 4, 2, S, seed=0, shuffle_buffer=8), range(3))
    assert first != pids(ShardStream(str(out), 4, 2, S, seed=0, rank=1, world_size=2, shuffle_buffer=8), range(3))
    assert first != pids(ShardStream(str(out), 4, 2, S, seed=1, shuffle_buffer=8), range(3))
    # resume: reseeded at the step, the same continuation every time
    stream = ShardStream(str(out), 4, 2, S, seed=0, shuffle_buffer=8)
    pids(stream, range(2))
    state = stream.state_dict()
    assert state["step"] == 2 and state["seed"] == 0
    resumed = ShardStream(str(out), 4, 2, S, seed=0, shuffle_buffer=8)
    resumed.load_state_dict(state)
    again = ShardStream(str(out), 4, 2, S, seed=0, shuffle_buffer=8)
    a, b = resumed.next_batch(), again.next_batch(2)
    assert a.text_pids.tolist() == b.text_pids.tolist() and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"step": 2, "seed": 5})


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def corrupt_tar(shard_dir, tmp_path_factory):
    """Four broken samples first, then good ones copied from a real shard."""
    out, _ = shard_dir
    good = _all_samples(out)[:8]
    broken_jpeg = b"\xff\xd8\xff\xe0 not a jpeg"

    def meta(sample, **change):
        data = {"product_id": sample.product_id, "title": sample.title, "index": sample.index, "images": ["0.jpg"]}
        return json.dumps({**data, **change}).encode()

    samples = [
        ("badjpeg", {"0.jpg": broken_jpeg, "json": meta(good[0], product_id="badjpeg", index=9001)}),
        ("badjson", {"0.jpg": good[1].images[0], "json": b"{not json"}),
        ("notitle", {"0.jpg": good[2].images[0], "json": json.dumps({"product_id": "x", "images": ["0.jpg"]}).encode()}),
        # one broken image of two: the product stays, with its good image
        ("halfbad", {"0.jpg": broken_jpeg, "1.jpg": good[3].images[0], "json": meta(good[3], images=["0.jpg", "1.jpg"])}),
    ]
    samples += [(s.key, {"0.jpg": s.images[0], "json": meta(s)}) for s in good[4:]]
    folder = tmp_path_factory.mktemp("corrupt")
    return _tar(folder / "corrupt.tar", samples), good


def test_broken_samples_are_skipped_and_counted(shard_dir, corrupt_tar, tmp_path):
    path, good = corrupt_tar
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes((shard_dir[0] / "shard-000000.tar").read_bytes()[:5000])
    stream = ShardStream([path, str(truncated)], 2, 2, S, seed=0, shuffle_buffer=2)
    seen = set()
    for step in range(12):
        batch = stream.next_batch(step)
        assert batch.images.shape == (4, 3, S, S)
        seen.update(batch.text_pids.tolist())
    assert 9001 not in seen and good[3].index in seen
    assert seen <= {s.index for s in good[3:]}
    for reason in ("bad json", "missing field", "unreadable image", "no usable image", "tar error"):
        assert stream.skipped[reason] > 0, (reason, stream.skipped)


def test_only_broken_shards_fail_loudly_instead_of_hanging(tmp_path):
    path = _tar(tmp_path / "bad.tar", [("a", {"json": b"{"})])
    stream = ShardStream([path], 1, 1, S)
    with pytest.raises(RuntimeError, match="without a usable sample"):
        stream.next_batch(0)
    meta = json.dumps({"product_id": "b", "title": "t", "images": ["0.jpg"]}).encode()
    path = _tar(tmp_path / "undecodable.tar", [("b", {"0.jpg": b"\xff\xd8 not a jpeg", "json": meta})])
    config = StreamConfig(urls=(path,), products_per_batch=1, images_per_product=1, image_size=S, max_unusable_products=5)
    with pytest.raises(RuntimeError, match="without a decodable image"):
        next(generate_batches(config))


def test_fsspec_memory_and_brace_urls(shard_dir):
    out, _ = shard_dir
    index = json.loads((out / INDEX_NAME).read_text())
    fs = fsspec.filesystem("memory")
    for name in [INDEX_NAME] + [s["name"] for s in index["shards"]]:
        with fs.open(f"/eclip-test/{name}", "wb") as handle:
            handle.write((out / name).read_bytes())
    # a brace pattern on the local disk, the same in fsspec's memory filesystem, and the folder
    # (shards listed by its shards.json): the same shards, so the same batches
    urls = [f"{out}/{index['pattern']}", f"file://{out}/{index['pattern']}", f"memory://eclip-test/{index['pattern']}", "memory://eclip-test/"]
    batches = []
    for url in urls:
        # one stream at a time: the memory filesystem hands every reader the same file object
        stream = ShardStream(url, 4, 2, S, seed=3, shuffle_buffer=8)
        assert stream.products == index["products"]
        batches.append([stream.next_batch(step) for step in range(2)])
        stream.close()
    fs.rm("/eclip-test", recursive=True)
    for other in batches[1:]:
        for a, b in zip(batches[0], other):
            assert torch.equal(a.images, b.images) and a.text_pids.tolist() == b.text_pids.tolist()


def test_dataloader_workers_draw_different_streams(corrupt_tar):
    path, _ = corrupt_tar
    stream = ShardStream([path], 2, 2, S, seed=0, num_workers=2, shuffle_buffer=2)
    batches = [stream.next_batch(step) for step in range(4)]
    stream.close()
    config = StreamConfig(urls=(path,), products_per_batch=2, images_per_product=2, image_size=S, seed=0, shuffle_buffer=2)
    # batch 2w + j comes from worker w's j-th batch, each worker its own seeded stream
    for worker in (0, 1):
        own = generate_batches(config, worker, 2)
        for j in range(2):
            expected, _ = next(own)
            assert torch.equal(batches[2 * j + worker].images, expected.images)
    assert not torch.equal(batches[0].images, batches[1].images)
    assert stream.skipped["bad json"] >= 2  # counted in both workers, reported to this process


def test_batch_sources_and_cli(catalog, tmp_path):
    path, products = catalog
    assert main(["shard", "--catalog", str(path), "--out", str(tmp_path), "--max-count", "20", "--no-progress"]) == 0
    assert json.loads((tmp_path / INDEX_NAME).read_text())["products"] == len(products)
    source = make_batch_source(str(tmp_path), 4, 2, S, seed=0, shuffle_buffer=8)
    assert isinstance(source, ShardStream)
    assert source.next_batch(0).images.shape == (8, 3, S, S)
    # P is the global batch: each of 2 ranks streams 2 products
    rank1 = make_batch_source(str(tmp_path), 4, 2, S, seed=0, rank=1, world_size=2, shuffle_buffer=8)
    assert rank1.next_batch(0).images.shape == (4, 3, S, S)
    with pytest.raises(ValueError, match="divisible"):
        make_batch_source(str(tmp_path), 5, 2, S, rank=0, world_size=2)
    mapped = make_batch_source(None, 4, 2, S, seed=3, products=products)
    assert isinstance(mapped, MapBatchSource)
    store = ImageStore(products, S)
    slots = PKSampler([len(p.images) for p in products], 4, 2, 3).batch(5)
    # each product's views from the generator of its first slot in the global batch
    expected = [collate(store, slots[i : i + 2], augmentation_generator(3, 5, i)) for i in range(0, 8, 2)]
    got = mapped.next_batch(5)
    assert torch.equal(got.images, torch.cat([b.images for b in expected])) and mapped.state_dict() == {"step": 6, "seed": 3}
    assert got.titles == [t for b in expected for t in b.titles]
    # two ranks' shares put together are the one-process batch, views included
    halves = [make_batch_source(None, 4, 2, S, seed=3, store=store, rank=r, world_size=2).next_batch(5) for r in (0, 1)]
    assert torch.equal(torch.cat([h.images for h in halves]), got.images)
    assert torch.cat([h.text_pids for h in halves]).tolist() == got.text_pids.tolist()
    with pytest.raises(ValueError, match="divisible"):
        make_batch(store, slots, 3, 5, rank=0, world_size=3)
    assert main(["shard", "--catalog", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 1


def test_a_missing_reader_library_is_not_mistaken_for_a_missing_index(shard_dir, monkeypatch):
    """Without webdataset (the scale extra) the stream says what to install, rather than
    "no readable shards.json"."""
    import sys

    from eclip.data.shards import read_index

    folder = str(shard_dir[0])
    assert read_index(folder) is not None
    assert read_index(folder + "/missing.json") is None  # a missing index is not an error here
    monkeypatch.setitem(sys.modules, "webdataset.gopen", None)
    with pytest.raises(ImportError, match=r"pip install 'eclip\[scale\]'"):
        read_index(folder)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("image_size", [None, S], ids=["copied", "reencoded"])
def test_workers_and_ranks_write_what_one_process_writes(catalog, tmp_path, image_size):
    """2 encoding processes, and 3 ranks merged, give byte for byte the shards and index of one
    process (by size limit: every shard boundary depends on every sample before it)."""
    path, _ = catalog
    options = dict(max_size_mb=0.03, image_size=image_size, seed=4)
    write_shards(path, tmp_path / "one", workers=1, **options)
    expected = _folder_bytes(tmp_path / "one")
    assert len(expected) > 3 and INDEX_NAME in expected
    write_shards(path, tmp_path / "two", workers=2, **options)
    assert _folder_bytes(tmp_path / "two") == expected

    out = tmp_path / "ranks"
    reports = [write_shards(path, out, workers=1, rank=rank, world_size=3, **options) for rank in (2, 0)]
    assert not (out / INDEX_NAME).exists() and all("part" in r.summary() for r in reports)  # rank 1 is missing
    with pytest.raises(ValueError, match=r"missing ranks.*\[1\]"):
        merge_shards(out)
    merged = write_shards(path, out, workers=2, rank=1, world_size=3, **options)  # completes the set: merges
    assert _folder_bytes(out) == expected and not (out / ".parts").exists()
    assert merged.products == json.loads(expected[INDEX_NAME])["products"]


def test_shard_cli_ranks_then_merge(catalog, tmp_path, monkeypatch, capsys):
    """--rank/--world-size write parts; torchrun's RANK/WORLD_SIZE are read when they are not
    given; --merge merges by hand (here after the automatic merge is prevented)."""
    path, _ = catalog
    base = ["shard", "--catalog", str(path), "--max-count", "9", "--no-progress", "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "ranks"
    assert main([*base, "--out", str(out), "--rank", "0", "--world-size", "2"]) == 0
    assert "1 of 2 parts" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("eclip.data.shards.write._claim", lambda path: False)  # as if another rank merges
    assert main([*base, "--out", str(out)]) == 0
    assert len(list((out / ".parts").glob("rank-*-of-00002.json"))) == 2 and not (out / INDEX_NAME).exists()
    monkeypatch.undo()
    assert main(["shard", "--merge", "--out", str(out), "--no-progress"]) == 0
    assert _folder_bytes(out) == _folder_bytes(tmp_path / "one")
    assert main(["shard", "--merge", "--out", str(out)]) == 1  # nothing left to merge
    assert main(["shard", "--out", str(out)]) == 2  # no catalog
