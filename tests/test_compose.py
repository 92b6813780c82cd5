import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from eclip.data import load_catalog
from eclip.data.compose import ComposeConfig, compose_catalog, cut_out, cut_out_mask, render_scene
from eclip_app.cli import main

# one pure colour per product, grouped by category; the scene backgrounds never reach 0 or 255
# in a channel, so an exact match of these colours is the product itself
COLOURS = {
    "tee": [(255, 0, 0), (255, 0, 255)],
    "shoe": [(0, 255, 0), (0, 255, 255)],
    "bag": [(0, 0, 255), (255, 255, 0)],
}


def _photo(colour, shape: str, size: int = 96) -> Image.Image:
    """A studio shot: a flat-coloured product on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if shape == "ellipse":
        draw.ellipse((20, 10, 76, 86), fill=colour)
    else:
        draw.rectangle((15, 25, 80, 70), fill=colour)
    return image


@pytest.fixture(scope="module")
def clean_catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    (root / "images").mkdir()
    lines = []
    for category, colours in COLOURS.items():
        for k, colour in enumerate(colours):
            pid = f"{category}{k}"
            _photo(colour, "ellipse" if k == 0 else "rect").save(root / "images" / f"{pid}.png")
            lines.append(json.dumps({"product_id": pid, "title": f"acme {category} number {k}", "category": category,
                                     "images": [f"images/{pid}.png"]}))
    (root / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    return root / "catalog.jsonl"


@pytest.fixture(scope="module")
def scenes(clean_catalog, tmp_path_factory) -> Path:
    products, _ = load_catalog(clean_catalog)
    out = tmp_path_factory.mktemp("scenes")
    compose_catalog(products, out, ComposeConfig(scenes_per_product=3, size=64, seed=5), progress=False)
    return out / "catalog.jsonl"


def test_cut_out_mask_of_a_product_on_white():
    photo = np.array(_photo((30, 90, 200), "rect"))
    # a white logo inside the product is product, not background
    photo[40:50, 40:50] = 255
    mask = cut_out_mask(photo)
    truth = np.zeros(mask.shape, bool)
    truth[25:71, 15:81] = True
    assert (mask == truth).all()

    # JPEG noise on the white and a speck of dust: still the product and nothing else
    noisy = np.array(_photo((200, 40, 40), "ellipse")).astype(np.int16)
    noisy += np.random.default_rng(0).integers(-3, 4, noisy.shape)
    noisy[5, 5] = (120, 120, 120)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    truth = np.asarray(_photo((200, 40, 40), "ellipse"))[..., 1] < 128
    mask = cut_out_mask(noisy)
    assert not mask[5, 5]
    assert (mask != truth).mean() < 0.01

    rgba, ok = cut_out(Image.fromarray(photo))
    assert ok and rgba.mode == "RGBA" and rgba.size == (66, 46)  # cropped to the product


def test_scene_box_holds_the_product_and_stays_inside():
    config = ComposeConfig(size=96)
    product, _ = cut_out(_photo((255, 0, 255), "ellipse"))
    distractors = [cut_out(_photo(c, "rect"))[0] for c in [(0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 0)]]
    occluded = 0
    for seed in range(40):
        rng = random.Random(seed)
        scene, boxes = render_scene(product, distractors[: 1 + seed % 5], rng, config)
        x0, y0, x1, y1 = boxes["box"]
        fx0, fy0, fx1, fy1 = boxes["full_box"]
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        assert fx0 <= x0 and fy0 <= y0 and x1 <= fx1 and y1 <= fy1
        assert boxes["occlusion"] <= config.max_occlusion
        occluded += boxes["occlusion"] > 0
        pixels = np.asarray(scene)
        ys, xs = np.nonzero((pixels == (255, 0, 255)).all(axis=2))
        assert len(xs) > 0
        # every visible product pixel lies in the box, and the box is tight around them (the
        # box also counts its anti-aliased rim and pixels half-covered by an occluder)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert max(xs.min() - x0, x1 - 1 - xs.max(), ys.min() - y0, y1 - 1 - ys.max()) <= 3
    assert occluded > 0  # occlusion does happen


def test_compose_catalog(scenes, clean_catalog):
    products, report = load_catalog(scenes)
    assert len(products) == 6 and not report.skipped
    records = [json.loads(line) for line in scenes.read_text().splitlines()]
    category = {r["product_id"]: r["category"] for r in records}
    for product, record in zip(products, records):
        assert len(product.images) == 3  # K scenes per product
        for image, entry in zip(product.images, record["images"]):
            x0, y0, x1, y1 = image.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert Image.open(image.path).size == (64, 64)
            assert 1 <= len(entry["distractors"]) <= 5
            assert all(category[d] != record["category"] for d in entry["distractors"])  # other categories


def test_compose_is_deterministic_by_seed(scenes, clean_catalog, tmp_path):
    products, _ = load_catalog(clean_catalog)
    compose_catalog(products, tmp_path / "a", ComposeConfig(scenes_per_product=3, size=64, seed=5), progress=False)
    assert (tmp_path / "a" / "catalog.jsonl").read_text() == scenes.read_text()
    for name in ["000000_tee0_0.jpg", "000005_bag1_2.jpg"]:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (scenes.parent / "images" / name).read_bytes()
    # the same product's scenes do not depend on which other products are composed with it
    compose_catalog(products[:1] + products[2:], tmp_path / "b", ComposeConfig(scenes_per_product=1, size=64, seed=5), progress=False)
    assert (tmp_path / "b" / "images" / "000000_tee0_0.jpg").read_bytes() == (scenes.parent / "images" / "000000_tee0_0.jpg").read_bytes()
    compose_catalog(products, tmp_path / "c", ComposeConfig(scenes_per_product=1, size=64, seed=6), progress=False)
    assert (tmp_path / "c" / "images" / "000000_tee0_0.jpg").read_bytes() != (scenes.parent / "images" / "000000_tee0_0.jpg").read_bytes()


def test_keep_clean_and_single_category_fallback(clean_catalog, tmp_path, capsys):
    products, _ = load_catalog(clean_catalog)
    result = compose_catalog(products[:2], tmp_path / "one", ComposeConfig(scenes_per_product=1, size=48, keep_clean=True), progress=False)
    assert result.fallback_distractors == 2  # one category: distractors are the other product
    composed, _ = load_catalog(result.catalog)
    clean = composed[0].images[-1]
    assert Path(clean.path) == Path(products[0].images[0].path).resolve()
    assert clean.box == pytest.approx((20 / 96, 10 / 96, 77 / 96, 87 / 96))  # the cut-out's box

    code = main(["-q", "compose", "--catalog", str(clean_catalog), "--out", str(tmp_path / "cli"), "--scenes-per-product", "2", "--size", "48", "--no-progress"])
    assert code == 0 and "12 scenes of 6 products" in capsys.readouterr().out


def test_unreadable_photo_is_skipped(clean_catalog, tmp_path):
    products, _ = load_catalog(clean_catalog)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    products[1].images[0].path = str(broken)
    result = compose_catalog(products, tmp_path / "out", ComposeConfig(scenes_per_product=2, size=48), progress=False)
    assert result.unreadable == 1 and result.products == 5 and result.scenes == 10
    records = [json.loads(line) for line in result.catalog.read_text().splitlines()]
    assert products[1].product_id not in {r["product_id"] for r in records}
    assert all(products[1].product_id not in i["distractors"] for r in records for i in r["images"])
