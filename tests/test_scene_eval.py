"""Scene-to-catalog evaluation: one pass equals the former two passes, oracles score 1, hinted
retrieval, grouped metrics and their table."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eclip.data import load_catalog
from eclip.data.catalog import ProductImage
from eclip.data.dataset import ImageStore
from eclip.data.transforms import normalize
from eclip.evaluation import evaluate, point_in_box
from eclip.model.eclip import ECLIP, ImageEncoding
from eclip.retrieval import image_text_query
from eclip.scene_eval import bucket_names, evaluate_scenes, scene_groups, scene_table
from eclip_app.cli import main

from .conftest import micro_config

ROOT = Path(__file__).resolve().parents[1]


def _two_pass():
    spec = importlib.util.spec_from_file_location("eval_speed", ROOT / "benchmarks" / "eval_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.two_pass_evaluate_scenes


@pytest.mark.parametrize("decoder", [True, False])
def test_one_pass_matches_the_two_pass_evaluation(scenes, clean_catalog, decoder):
    torch.manual_seed(0)
    model = ECLIP(micro_config(decoder=decoder))
    scene_products, _ = load_catalog(scenes)
    catalog_products, _ = load_catalog(clean_catalog)
    calls = []
    encode = model.encode_image
    model.encode_image = lambda images: calls.append(len(images)) or encode(images)
    results = evaluate_scenes(model, scene_products, catalog_products, batch_size=5, progress=False)
    assert sum(calls) == 18 + 6  # every scene and gallery image through the tower exactly once
    del model.encode_image
    reference = _two_pass()(model, scene_products, catalog_products, batch_size=7)
    assert results["num_scenes"] == 18 and results["num_gallery"] == 6
    for key, value in reference.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
    assert results["scene_to_catalog_r10"] == 1.0  # six products: the right one is always in the top 10


def _oracle_lookup(model, *catalogs):
    """Image tensor bytes -> (product_id, box) for every image the evaluation will load."""
    table = {}
    for products in catalogs:
        store = ImageStore(products, model.image_size)
        for p, product in enumerate(products):
            for i, image in enumerate(product.images):
                key = normalize(store.get(p, i).unsqueeze(0))[0].numpy().tobytes()
                table[key] = (product.product_id, image.box)
    return table


def test_evaluate_scenes_oracles(scenes, clean_catalog, monkeypatch):
    """An encoder that knows each image's product (its global embedding) and box (its map):
    retrieval and grounding are perfect, overall and in every group."""
    model = ECLIP(micro_config(decoder=False))
    scene_products, _ = load_catalog(scenes)
    catalog_products, _ = load_catalog(clean_catalog)
    extra = load_catalog(scenes)[0][:1]
    extra[0].product_id = "not-in-catalog"
    table = _oracle_lookup(model, scene_products, catalog_products)
    ids = sorted({p.product_id for p in catalog_products})
    size = model.image_size

    def encode_image(images):
        found = [table[image.numpy().tobytes()] for image in images]
        onehot = torch.nn.functional.one_hot(torch.tensor([ids.index(pid) for pid, _ in found]), model.config.embed_dim).float()
        masks = torch.zeros(len(images), 1, size, size)
        for mask, (_, box) in zip(masks, found):
            if box is not None:
                x0, y0, x1, y1 = (round(v * size) for v in box)
                mask[0, y0:y1, x0:x1] = 1.0
        return ImageEncoding(onehot, None, None, masks, images.flatten(2).transpose(1, 2), (size, size))

    monkeypatch.setattr(model, "encode_image", encode_image)
    monkeypatch.setattr(model, "heatmaps_from", lambda encoding, texts, grounding_map=None: (encoding.attention[:, 0], None))
    results = evaluate_scenes(model, scene_products + extra, catalog_products, batch_size=4, progress=False)
    assert results["scene_to_catalog_map10"] == 1.0 and results["scene_to_catalog_r1"] == 1.0
    assert results["scene_grounding_acc50"] == 1.0 and results["scene_grounding_pointing"] == 1.0
    assert results["scene_unmatched_products"] == 1 and results["num_scenes"] == 18
    assert results["scene_grounding_acc50_random_box"] < 1.0
    grouped = [k for k in results if k.startswith("by_") and k.endswith("/scene_to_catalog_r1")]
    assert grouped and all(results[k] == 1.0 for k in grouped)
    assert all(results[k] == 1.0 for k in results if k.startswith("by_") and k.endswith("/scene_grounding_pointing"))


def test_groups_partition_the_scenes(scenes, clean_catalog):
    model = ECLIP(micro_config())
    scene_products, _ = load_catalog(scenes)
    catalog_products, _ = load_catalog(clean_catalog)
    results = evaluate_scenes(model, scene_products, catalog_products, batch_size=8, progress=False, ground=False)
    assert "scene_grounding_acc50" not in results
    for grouping in ("area", "distractors", "occlusion"):  # every composed scene has all three
        counts = [v for k, v in results.items() if k.startswith(f"by_{grouping}/") and k.endswith("/num_scenes")]
        assert sum(counts) == 18, grouping
    # the groups follow the catalog's own fields
    raw = [json.loads(line) for line in scenes.read_text().splitlines()]
    occluded = sum(1 for r in raw for im in r["images"] if im["occlusion"] >= 0.01)
    assert results.get("by_occlusion/<1%/num_scenes", 0) == 18 - occluded
    table = scene_table(results, "area")
    assert table.splitlines()[0].startswith("| area | all | ")
    assert "| scenes | 18 |" in table and "scene_to_catalog_hinted_map10" in table
    # the composer records each scene's regime: these were all made with the default, large
    assert scene_table(results, "regime").splitlines()[0] == "| regime | all | large |"


def test_hinted_retrieval_uses_the_category_not_the_title(scenes, clean_catalog, monkeypatch):
    model = ECLIP(micro_config())
    scene_products, _ = load_catalog(scenes)
    catalog_products, _ = load_catalog(clean_catalog)
    seen = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: seen.extend(texts) or encode_text(texts))
    results = evaluate_scenes(model, scene_products, catalog_products, progress=False, ground=False, hint_template="the {}")
    assert sorted(seen) == ["the bag", "the shoe", "the tee"]
    assert results["num_hinted_scenes"] == 18
    for key in ("scene_to_catalog_hinted_map10", "scene_to_catalog_hinted_r1", "scene_to_catalog_hinted_r10"):
        assert 0.0 <= results[key] <= 1.0
    for product in scene_products:  # without categories there is no hint to give
        product.category = None
    assert "scene_to_catalog_hinted_map10" not in evaluate_scenes(model, scene_products, catalog_products, progress=False, ground=False)


def test_image_text_query_weights_and_selection():
    torch.manual_seed(0)
    model = ECLIP(micro_config()).eval()
    with torch.no_grad():
        encoding = model.encode_image(torch.randn(3, 3, 32, 32))
        texts = model.encode_text(["a red tee", "a shoe", "a bag"])
    query = image_text_query(model, encoding, texts, text_weight=1.0)
    assert torch.allclose(query, texts, atol=1e-6)  # all text
    image_only = image_text_query(model, encoding, texts, text_weight=0.0, readout="global")
    assert torch.allclose(image_only, encoding.global_embedding, atol=1e-6)
    assert torch.allclose(image_text_query(model, encoding, texts, field="global").norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="text_weight"):
        image_text_query(model, encoding, texts, text_weight=1.5)


def test_scene_groups_and_bucket_names():
    assert bucket_names((0.1, 0.25), percent=True) == ["<10%", "10-25%", ">=25%"]
    assert bucket_names((2, 4), percent=False) == ["0-1", "2-3", "4+"]
    assert bucket_names((1,), percent=False) == ["0", "1+"]
    with pytest.raises(ValueError, match="increasing"):
        bucket_names((0.25, 0.1), percent=True)
    image = ProductImage("x.png", box=(0.0, 0.0, 0.5, 0.4), metadata={"distractors": ["a", "b"], "occlusion": 0.2, "regime": "small"})
    assert scene_groups(image) == {"area": "10-25%", "distractors": "2-3", "occlusion": ">=15%", "regime": "small"}
    image.metadata["area"] = 0.05  # the composer's own area wins over the box's
    assert scene_groups(image)["area"] == "<10%"
    assert scene_groups(ProductImage("y.png")) == {}
    assert scene_groups(image, area_edges=(0.01,))["area"] == ">=1%"


def test_point_in_box_edges():
    box = (0.2, 0.2, 0.6, 0.8)
    assert point_in_box((0.2, 0.8), box) and point_in_box((0.4, 0.5), box)
    assert not point_in_box((0.61, 0.5), box) and not point_in_box((0.4, 0.1), box)


def test_catalog_keeps_an_entry_s_other_fields(scenes):
    products, _ = load_catalog(scenes)
    meta = products[0].images[0].metadata
    assert set(meta) >= {"full_box", "occlusion", "distractors"} and "path" not in meta and "box" not in meta


def test_readout_and_grounding_map_arguments_read_the_model_that_way(synth_catalog):
    """evaluate(readout=, grounding_map=) equals evaluating a model configured that way, and
    differs from the model's own reading."""
    products = load_catalog(synth_catalog["heldout"])[0][:6]
    torch.manual_seed(0)
    model = ECLIP(micro_config())
    own = evaluate(model, products, progress=False)
    asked = evaluate(model, products, progress=False, readout="global", grounding_map="similarity")
    assert asked != own
    model.config = dataclasses.replace(model.config, readout="global", grounding_map="similarity")
    assert evaluate(model, products, progress=False) == asked


def test_evaluate_grounding_matches_model_ground(synth_catalog):
    """evaluate's grounding, read from the shared encoding, equals model.ground's boxes."""
    torch.manual_seed(0)
    products, _ = load_catalog(synth_catalog["heldout"])
    products = products[:8]
    model = ECLIP(micro_config())
    results = evaluate(model, products, batch_size=5, progress=False)
    store = ImageStore(products, model.image_size)
    slots = [(p, i) for p, product in enumerate(products) for i in range(len(product.images)) if product.images[i].box]
    images = normalize(torch.stack([store.get(p, i) for p, i in slots]))
    grounding = model.ground(images, [products[p].title for p, _ in slots])
    from eclip.model.grounding import box_iou

    ious = [box_iou(b, products[p].images[i].box) for b, (p, i) in zip(grounding.boxes, slots)]
    assert results["grounding_mean_iou"] == pytest.approx(np.mean(ious), abs=1e-6)


def test_cli_eval_scenes_prints_grouped_tables(scenes, clean_catalog, tmp_path, capsys):
    from eclip.io import save_model

    save_model(ECLIP(micro_config()), tmp_path / "model")
    args = ["-q", "eval-scenes", "--model", str(tmp_path / "model"), "--scenes", str(scenes), "--catalog", str(clean_catalog), "--no-progress"]
    assert main(args + ["--group-by", "area,occlusion"]) == 0
    out = capsys.readouterr().out
    assert "| area | all |" in out and "| occlusion | all |" in out and "| distractors |" not in out
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_scenes"] == 18
    assert main(args + ["--json", "--tiles", "2", "--hint-weight", "0.25"]) == 0
    tiled = json.loads(capsys.readouterr().out)
    assert 0.0 <= tiled["scene_to_catalog_tiled_map10"] <= 1.0 and "scene_grounding_tiled_pointing" in tiled
    with pytest.raises(SystemExit):
        main(args + ["--hint-weight", "2"])
