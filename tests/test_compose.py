import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from eclip.data import load_catalog
from eclip.data.compose import (
    BACKGROUNDS,
    REGIMES,
    ComposeConfig,
    background,
    camera,
    compose_catalog,
    cut_out,
    cut_out_mask,
    merge_parts,
    regime_config,
    render_scene,
    share,
    skin_fraction,
)
from eclip_app.cli import main

from .conftest import studio_photo


def test_cut_out_mask_of_a_product_on_white():
    photo = np.array(studio_photo((30, 90, 200), "rect"))
    # a white logo inside the product is product, not background
    photo[40:50, 40:50] = 255
    mask = cut_out_mask(photo)
    truth = np.zeros(mask.shape, bool)
    truth[25:71, 15:81] = True
    assert (mask == truth).all()

    # JPEG noise on the white and a speck of dust: still the product and nothing else
    noisy = np.array(studio_photo((200, 40, 40), "ellipse")).astype(np.int16)
    noisy += np.random.default_rng(0).integers(-3, 4, noisy.shape)
    noisy[5, 5] = (120, 120, 120)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    truth = np.asarray(studio_photo((200, 40, 40), "ellipse"))[..., 1] < 128
    mask = cut_out_mask(noisy)
    assert not mask[5, 5]
    assert (mask != truth).mean() < 0.01

    rgba, ok = cut_out(Image.fromarray(photo))
    assert ok and rgba.mode == "RGBA" and rgba.size == (66, 46)  # cropped to the product


def test_scene_box_holds_the_product_and_stays_inside():
    config = ComposeConfig(size=96)
    product, _ = cut_out(studio_photo((255, 0, 255), "ellipse"))
    distractors = [cut_out(studio_photo(c, "rect"))[0] for c in [(0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 0)]]
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


# ---------------------------------------------------------------------------- workers, ranks


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").iterdir())}


def test_output_is_the_same_for_any_workers_and_ranks(scenes, clean_catalog, tmp_path):
    products, _ = load_catalog(clean_catalog)
    config = ComposeConfig(scenes_per_product=3, size=64, seed=5)
    result = compose_catalog(products, tmp_path / "w2", config, progress=False, workers=2)
    assert result.workers == 2 and result.scenes == 18
    assert (tmp_path / "w2" / "catalog.jsonl").read_text() == scenes.read_text()
    assert _tree(tmp_path / "w2") == _tree(scenes.parent)
    assert not list((tmp_path / "w2").glob(".cutouts-*"))  # the shared cut-outs are removed at the end

    # three ranks into one folder: the last one merges the parts into the single-run catalog
    out = tmp_path / "ranks"
    results = [compose_catalog(products, out, config, progress=False, workers=1 + r % 2, rank=r, world_size=3) for r in [2, 0, 1]]
    assert [r.merged for r in results[:2]] == [None, None] and results[2].merged == out / "catalog.jsonl"
    assert sorted(p.name for p in out.glob("catalog.part-*")) == [f"catalog.part-0000{r}-of-00003.jsonl" for r in range(3)]
    assert (out / "catalog.jsonl").read_text() == scenes.read_text()
    assert _tree(out) == _tree(scenes.parent)
    assert [len(share(7, r, 3)) for r in range(3)] == [2, 2, 3] and share(7, 2, 3).stop == 7

    (out / "catalog.part-00001-of-00003.jsonl").unlink()
    with pytest.raises(ValueError, match=r"ranks \[1\] \(of world size 3\) are missing"):
        merge_parts(out)
    with pytest.raises(ValueError, match="rank 3 is not in"):
        share(6, 3, 3)


def test_cli_ranks_and_merge(clean_catalog, scenes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    common = ["-q", "compose", "--catalog", str(clean_catalog), "--out", str(out), "--scenes-per-product", "3", "--size", "64",
              "--seed", "5", "--no-progress", "--workers", "1"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    monkeypatch.setenv("RANK", "1")
    assert main(common) == 0 and "the last rank merges" in capsys.readouterr().out
    assert main([*common, "--rank", "0"]) == 0 and "whole catalog" in capsys.readouterr().out
    assert (out / "catalog.jsonl").read_text() == scenes.read_text()
    (out / "catalog.jsonl").unlink()
    assert main(["-q", "compose", "--out", str(out), "--merge"]) == 0
    assert (out / "catalog.jsonl").read_text() == scenes.read_text()


# ---------------------------------------------------------------------------- regimes and looks


def _records(catalog: Path) -> list[dict]:
    return [json.loads(line) for line in catalog.read_text().splitlines()]


def test_large_regime_is_the_original_setting():
    assert regime_config("large") == ComposeConfig()
    small = regime_config("small", size=96, distractors=(3, 3))
    assert small.product_area == REGIMES["small"]["product_area"] and small.distractors == (3, 3) and small.size == 96


@pytest.mark.parametrize("regime", ["small", "medium"])
def test_regime_scenes_keep_their_ranges(clean_catalog, tmp_path, regime):
    products, _ = load_catalog(clean_catalog)
    config = regime_config(regime, scenes_per_product=6, size=96, seed=1)
    compose_catalog(products, tmp_path, config, progress=False)
    images = [i for r in _records(tmp_path / "catalog.jsonl") for i in r["images"]]
    low, high = REGIMES[regime]["product_area"]
    lo_count, hi_count = REGIMES[regime]["distractors"]
    assert len(images) == 36
    for image in images:
        assert image["regime"] == regime
        x0, y0, x1, y1 = image["box"]
        assert image["area"] == pytest.approx((x1 - x0) * (y1 - y0) / 96**2, abs=1e-4)
        fx0, fy0, fx1, fy1 = image["full_box"]
        full = (fx1 - fx0) * (fy1 - fy0) / 96**2
        assert low * 0.8 <= full <= high * 1.05  # the pasted product's box (rounding to pixels)
        assert image["area"] <= full + 1e-4  # occlusion only shrinks the visible box
        assert lo_count <= len(image["distractors"]) <= hi_count
    fulls = [(i["full_box"][2] - i["full_box"][0]) * (i["full_box"][3] - i["full_box"][1]) / 96**2 for i in images]
    assert np.median(fulls) == pytest.approx((low + high) / 2, abs=(high - low) / 4)  # spread over the range


def test_mixed_regime_draws_each_regime_per_scene(clean_catalog, tmp_path):
    products, _ = load_catalog(clean_catalog)
    compose_catalog(products, tmp_path, regime_config("mixed", scenes_per_product=8, size=64), progress=False)
    images = [i for r in _records(tmp_path / "catalog.jsonl") for i in r["images"]]
    regimes = {i["regime"] for i in images}
    assert regimes == {"large", "medium", "small"}
    small = [i["area"] for i in images if i["regime"] == "small"]
    large = [i["area"] for i in images if i["regime"] == "large"]
    assert max(small) <= 0.15 * 1.05 and np.median(large) > np.median(small)


def _person_photo() -> Image.Image:
    image = Image.new("RGB", (96, 96), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((35, 5, 60, 30), fill=(224, 172, 140))  # a face
    draw.rectangle((30, 30, 66, 90), fill=(20, 20, 120))  # the garment
    return image


def test_looks_photo_backdrops_camera_and_people(clean_catalog, tmp_path):
    products, _ = load_catalog(clean_catalog)
    person = tmp_path / "model.png"
    _person_photo().save(person)
    assert skin_fraction(cut_out(_person_photo())[0]) > 0.1
    assert skin_fraction(cut_out(studio_photo((255, 0, 0), "rect"))[0]) == 0.0
    products[0].images[0].path = str(person)  # tee0 is now an apparel photo with its model
    config = ComposeConfig(scenes_per_product=4, size=64, backgrounds=("photo", "mosaic", "wood"), camera_probability=1.0,
                           people_probability=1.0, distractors=(0, 0))
    compose_catalog(products, tmp_path / "out", config, progress=False)
    records = {r["product_id"]: r for r in _records(tmp_path / "out" / "catalog.jsonl")}
    # no other distractors: the one listed is the person (found among a few drawn products)
    listed = [i["distractors"] for pid in ["shoe0", "shoe1", "bag0", "bag1"] for i in records[pid]["images"]]
    assert all(d in ([], ["tee0"]) for d in listed) and sum(d == ["tee0"] for d in listed) >= 12
    scene = np.asarray(Image.open(tmp_path / "out" / records["shoe0"]["images"][0]["path"]))
    assert scene.shape == (64, 64, 3) and scene.std() > 5


@pytest.mark.parametrize("kind", BACKGROUNDS)
def test_background_kinds(kind):
    photo = np.asarray(studio_photo((200, 40, 40), "ellipse"))
    out = background(np.random.default_rng(3), 80, (kind,), photos=lambda rng: photo)
    again = background(np.random.default_rng(3), 80, (kind,), photos=lambda rng: photo)
    assert out.shape == (80, 80, 3) and out.dtype == np.uint8 and (out == again).all()
    assert out.mean() < 250  # never the plain white of a catalog photo
    if kind in ("noise", "fabric", "wood", "mosaic", "stripes", "tiles"):
        # a texture, not a flat colour under the fine noise every backdrop gets
        assert np.abs(np.diff(out.astype(float), axis=1)).mean() > 2 or out.std() > 12
    if kind in ("photo", "mosaic"):
        with pytest.raises(ValueError, match="needs catalog photos"):
            background(np.random.default_rng(3), 80, (kind,))
    shot = camera(Image.fromarray(out), np.random.default_rng(0))
    assert shot.size == (80, 80) and shot.mode == "RGB" and (np.asarray(shot) != out).any()


def test_bad_settings_are_named(clean_catalog, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"distractors \(3, 1\) is not \(low, high\)"):
        ComposeConfig(distractors=(3, 1)).validate()
    with pytest.raises(ValueError, match="unknown background kinds"):
        ComposeConfig(backgrounds=("marble",)).validate()
    with pytest.raises(ValueError, match="regime 'tiny'"):
        regime_config("tiny")
    base = ["-q", "compose", "--catalog", str(clean_catalog), "--out", str(tmp_path / "x"), "--no-progress"]
    for flags, message in [
        (["--product-area", "0.3,0.1"], "is not LOW,HIGH with LOW <= HIGH"),
        (["--distractors", "two,4"], "is not LOW,HIGH (ints)"),
        (["--backgrounds", "solid,marble"], "unknown background 'marble'"),
        (["--camera", "1.5"], "is not a probability"),
    ]:
        with pytest.raises(SystemExit):
            main(base + flags)
        assert message in capsys.readouterr().err
    for flags, message in [
        (["--regime", "mixed", "--product-area", "0.1,0.2"], "--product-area set one regime's geometry"),
        (["--product-area", "0,0.2"], "product_area (0.0, 0.2) is not (low, high)"),
        (["--rank", "2", "--world-size", "2"], "--rank 2 is not in [0, --world-size 2)"),
        (["--workers", "-1"], "--workers -1 must be >= 1"),
    ]:
        assert main(base + flags) == 2
        assert message in capsys.readouterr().err
    # a side range given to an area regime replaces the preset's area range
    assert main(base + ["--regime", "small", "--product-scale", "0.5,0.5", "--limit", "1", "--scenes-per-product", "1", "--size", "64"]) == 0
    assert json.loads((tmp_path / "x" / "compose.json").read_text())["product_area"] is None
    assert main(["-q", "compose", "--out", str(tmp_path / "empty"), "--merge"]) == 1
    assert "expected catalog parts of one world size" in capsys.readouterr().err


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
