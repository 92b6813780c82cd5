import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from eclip.data import (
    CatalogError,
    ImageStore,
    PKSampler,
    ShopSynthConfig,
    collate,
    generate,
    load_catalog,
)
from eclip.data.shopsynth import COLOURS


def _image(path, size=(16, 12), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_catalog_lines_are_reported_skipped_and_counted(tmp_path, caplog):
    good = _image(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    lines = [
        json.dumps({"product_id": "a", "title": "red tee", "images": [good]}),  # 1 ok
        "{not json",  # 2 malformed
        json.dumps({"product_id": "b", "images": [good]}),  # 3 missing title
        json.dumps({"product_id": "c", "title": "   ", "images": [good]}),  # 4 empty title
        json.dumps({"product_id": "a", "title": "again", "images": [good]}),  # 5 duplicate id
        json.dumps({"product_id": "d", "title": "gone", "images": ["missing.png"]}),  # 6 missing image
        json.dumps({"product_id": "e", "title": "broken", "images": ["broken.jpg"]}),  # 7 unreadable
        json.dumps({"product_id": "f", "title": "half", "images": [good, "missing.png"]}),  # 8 kept, one image dropped
        json.dumps({"product_id": "g", "title": "boxed", "images": [{"path": good, "box": [0, 0, 99, 5]}]}),  # 9 box outside
        json.dumps(["a", "list"]),  # 10 not an object
        json.dumps({"product_id": "h", "title": "url", "images": ["https://example.com/x.jpg"]}),  # 11 remote
    ]
    catalog = _write(tmp_path / "catalog.jsonl", lines)
    products, report = load_catalog(catalog)
    assert [p.product_id for p in products] == ["a", "f"]
    assert len(products[1].images) == 1
    assert report.products == 2 and report.images == 2
    assert report.skipped == Counter({
        "malformed line": 2, "missing field": 1, "empty title": 1, "duplicate product id": 1,
        "unreadable image": 4, "no usable image": 4, "bad box": 1,
    })
    # every problem names the file and the line
    for line_number in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11):
        assert any(p.startswith(f"{catalog}:{line_number}:") for p in report.problems), line_number
    assert "broken.jpg" in " ".join(report.problems)
    assert "2 products, 2 images kept" in report.summary()


def test_catalog_with_nothing_usable_fails_clearly(tmp_path):
    catalog = _write(tmp_path / "c.jsonl", ["{bad", json.dumps({"product_id": "x", "title": "", "images": ["a.png"]})])
    with pytest.raises(CatalogError, match="no usable product"):
        load_catalog(catalog)
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "nope.jsonl")


def test_boxes_become_fractions(tmp_path):
    name = _image(tmp_path / "i.png", size=(40, 20))
    catalog = _write(tmp_path / "c.jsonl", [json.dumps({"product_id": "p", "title": "t", "images": [{"path": name, "box": [10, 5, 30, 15]}], "category": "mug"})])
    products, _ = load_catalog(catalog)
    assert products[0].images[0].box == pytest.approx((0.25, 0.25, 0.75, 0.75))
    assert products[0].category == "mug"


def test_image_store_survives_a_file_broken_after_validation(tmp_path, caplog):
    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png", colour=(0, 0, 255))
    catalog = _write(tmp_path / "c.jsonl", [json.dumps({"product_id": "p", "title": "t", "images": [a, b]})])
    products, _ = load_catalog(catalog)
    (tmp_path / "a.png").write_bytes(b"garbage")
    store = ImageStore(products, 8)
    image = store.get(0, 0)  # falls back to the product's other image
    assert image.shape == (3, 8, 8) and image[2].float().mean() > 200
    assert store.failed == {(0, 0)}


def test_pk_sampler_guarantees():
    counts = [1, 2, 3, 4, 5, 1, 3, 3]
    sampler = PKSampler(counts, products_per_batch=4, images_per_product_in_batch=3, seed=7)
    seen = Counter()
    for step in range(sampler.batches_per_epoch):
        batch = sampler.batch(step)
        assert len(batch) == 12
        products = [s.product for s in batch]
        groups = [products[i : i + 3] for i in range(0, 12, 3)]
        assert all(len(set(g)) == 1 for g in groups)  # K consecutive slots per product
        assert len({g[0] for g in groups}) == 4  # P distinct products
        for g in range(4):
            slots = batch[3 * g : 3 * g + 3]
            n = counts[slots[0].product]
            fresh = [s.image for s in slots if not s.augment]
            assert len(fresh) == min(n, 3) and len(set(fresh)) == len(fresh)  # distinct where possible
            assert sum(s.augment for s in slots) == max(0, 3 - n)  # repeats only when short
            assert all(0 <= s.image < n for s in slots)
        seen.update(set(products))
    assert all(v == 1 for v in seen.values())  # no product twice in one epoch
    # deterministic by seed, different across seeds and epochs
    again = PKSampler(counts, 4, 3, seed=7)
    assert again.batch(5) == sampler.batch(5)
    assert PKSampler(counts, 4, 3, seed=8).batch(0) != sampler.batch(0)
    assert sampler.batch(0) != sampler.batch(sampler.batches_per_epoch)


def test_pk_sampler_resumes_from_state():
    a = PKSampler([3] * 20, 4, 2, seed=1)
    it = iter(a)
    first = [next(it) for _ in range(7)]
    b = PKSampler([3] * 20, 4, 2, seed=1)
    b.load_state_dict(a.state_dict())
    assert next(iter(b)) == next(it)
    assert first[0] == PKSampler([3] * 20, 4, 2, seed=1).batch(0)
    with pytest.raises(ValueError, match="seed"):
        PKSampler([3] * 20, 4, 2, seed=2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="exceeds"):
        PKSampler([3] * 3, 4, 2)


def test_collate_builds_multi_positive_batch(synth_catalog):
    products, _ = load_catalog(synth_catalog["train"])
    store = ImageStore(products, 32)
    sampler = PKSampler([1 if i % 2 else len(p.images) for i, p in enumerate(products)], 4, 2, seed=0)
    batch = collate(store, sampler.batch(0), torch.Generator().manual_seed(0))
    assert batch.images.shape == (8, 3, 32, 32)
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert len(batch.titles) == 4 and batch.text_pids.tolist() == batch.image_pids[::2].tolist()


def test_shopsynth_is_deterministic_split_and_boxed(tmp_path, synth_catalog):
    config = ShopSynthConfig(num_products=60, images_per_product=3, image_size=64, seed=3)
    paths = generate(tmp_path / "again", config, progress=False)
    assert paths["all"].read_text() == synth_catalog["all"].read_text()
    first = Image.open(synth_catalog["all"].parent / "images" / "p000000_0.png")
    second = Image.open(paths["all"].parent / "images" / "p000000_0.png")
    assert np.array_equal(np.asarray(first), np.asarray(second))

    train, _ = load_catalog(synth_catalog["train"])
    heldout, _ = load_catalog(synth_catalog["heldout"])
    assert len(train) + len(heldout) == 60 and len(heldout) == 12
    assert not {p.product_id for p in train} & {p.product_id for p in heldout}
    records = [json.loads(line) for line in synth_catalog["all"].read_text().splitlines()]
    for record in records[:20]:
        assert record["attributes"]["colour"] in record["title"]
        for entry in record["images"]:
            x0, y0, x1, y1 = entry["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # the product's own colour is inside its box
            pixels = np.asarray(Image.open(synth_catalog["all"].parent / entry["path"]).convert("RGB"))[y0:y1, x0:x1]
            colour = np.array(COLOURS[record["attributes"]["colour"]])
            assert (np.abs(pixels.astype(int) - colour).sum(-1) < 10).mean() > 0.05
