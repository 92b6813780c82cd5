"""Tiled reading: the tiles cover the image, crops and boxes map back exactly, the text picks
the tile and instance it matches, and the tiled evaluation keeps the untiled figures."""

import numpy as np
import pytest
import torch
from PIL import Image

from eclip.data import load_catalog
from eclip.model.eclip import ECLIP, ImageEncoding
from eclip.scene_eval import evaluate_scenes
from eclip.tiling import (
    best_match_scores,
    box_in_image,
    containing_tile,
    crop_tiles,
    ground_tiled,
    pil_tiles,
    tile_boxes,
    tiled_hinted_vectors,
    tiled_product_vectors,
)

from .conftest import micro_config


@pytest.mark.parametrize("grid", [2, 3])
def test_tiles_cover_the_image_and_overlap(grid):
    boxes = tile_boxes(grid, overlap=0.25)
    assert len(boxes) == 1 + grid * grid and boxes[0] == (0.0, 0.0, 1.0, 1.0)
    tiles = np.array(boxes[1:])
    assert tiles.min() == 0.0 and tiles.max() == pytest.approx(1.0)
    sides = tiles[:, 2] - tiles[:, 0]
    assert np.allclose(sides, sides[0]) and np.allclose(tiles[:, 3] - tiles[:, 1], sides[0])
    # neighbours overlap by a quarter of a side: every point of the image lies in some tile
    assert tiles[1, 0] == pytest.approx(0.75 * sides[0])
    points = np.random.default_rng(0).random((500, 2))
    inside = (points[:, None, 0] >= tiles[None, :, 0]) & (points[:, None, 0] <= tiles[None, :, 2]) & \
             (points[:, None, 1] >= tiles[None, :, 1]) & (points[:, None, 1] <= tiles[None, :, 3])
    assert inside.any(axis=1).all()
    assert tile_boxes(0) == tile_boxes(1) == [(0.0, 0.0, 1.0, 1.0)]
    with pytest.raises(ValueError, match="overlap"):
        tile_boxes(2, overlap=1.0)


def test_a_pyramid_of_grids_is_each_grid_s_crops_after_the_whole_image():
    pyramid = tile_boxes((2, 3))
    assert pyramid == tile_boxes(2) + tile_boxes(3)[1:]  # one whole image, then coarse to fine
    assert len(pyramid) == 1 + 4 + 9
    assert tile_boxes((0, 1)) == tile_boxes(0) and tile_boxes([3]) == tile_boxes(3)
    for bad in (-1, (2, -3), (2.5,)):
        with pytest.raises(ValueError, match="grids"):
            tile_boxes(bad)


def test_containing_tile_takes_the_smallest_tile_that_holds_the_box():
    boxes = tile_boxes((2, 3))  # 2 x 2 tiles of side 0.571 (1-4), 3 x 3 of side 0.4 (5-13)
    small = (0.05, 0.05, 0.2, 0.2)  # in the top-left tile of both grids: the finer one
    assert containing_tile(small, boxes) == 5
    medium = (0.05, 0.05, 0.5, 0.5)  # too large for a 0.4 tile, held by the 0.571 one
    assert containing_tile(medium, boxes) == 1
    assert containing_tile((0.0, 0.0, 0.9, 0.9), boxes) == 0


def test_crops_are_the_regions_resized_and_boxes_map_back():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    tiles = crop_tiles(images, boxes)
    assert tiles.shape == (6, 3, 8, 8)
    assert torch.equal(tiles[0], images[0]) and torch.equal(tiles[3], images[1])  # tile 0: the image as it is
    # a 4 x 4 quadrant blown up to 8 x 8 keeps its corner values' order and range
    quadrant = images[1, :, 4:, 4:]
    assert tiles[5].min() >= quadrant.min() - 1e-4 and tiles[5].max() <= quadrant.max() + 1e-4
    assert torch.allclose(tiles[5].mean(), quadrant.mean(), atol=1e-3)
    assert box_in_image((0.0, 0.0, 1.0, 1.0), boxes[2]) == boxes[2]
    assert box_in_image((0.5, 0.5, 1.0, 1.0), boxes[1]) == (0.25, 0.25, 0.5, 0.5)


def test_pil_tiles_cut_at_full_resolution():
    photo = Image.new("RGB", (400, 200), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 200, 100))  # the top-left quarter is red
    tiles = pil_tiles(photo, [(0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5)], size=32)
    assert tiles.shape == (2, 3, 32, 32) and tiles.dtype == torch.uint8
    assert (tiles[1, 0] == 255).all() and (tiles[1, 2] == 0).all()  # the crop is all red
    assert tiles[0, 0, :16, :16].float().mean() > 250 and tiles[0, 2, 20:, 20:].float().mean() > 250


def _encoding(global_embedding, instances):
    b = len(global_embedding)
    return ImageEncoding(global_embedding, instances, torch.zeros(instances.shape[:2]), torch.full((b, instances.shape[1], 2, 2), 0.25),
                         torch.zeros(b, 4, 8), (2, 2))


def test_each_tile_gives_the_text_guided_query():
    model = ECLIP(micro_config())
    eye = torch.eye(8)
    # two images x three tiles x two instances; text 0 matches instance 1 of its tile 2
    instances = torch.zeros(6, 2, 8)
    instances[:, :, 7] = 1.0
    instances[2, 1] = eye[0]
    encoding = _encoding(torch.nn.functional.normalize(torch.ones(6, 8), dim=-1), instances)
    vectors = tiled_hinted_vectors(model, encoding, eye[:2], text_weight=0.0, readout="instance")
    assert vectors.shape == (2, 3, 8)
    assert torch.allclose(vectors[0, 2], eye[0], atol=1e-3)  # the instance text 0 selects there (softmax at 0.1)
    assert torch.allclose(vectors[1, 0], eye[7], atol=1e-5)  # nothing there matches text 1 better than the rest
    mixed = tiled_hinted_vectors(model, encoding, eye[:2], text_weight=0.5, readout="instance")
    assert torch.allclose(mixed[1, 0], torch.nn.functional.normalize(eye[7] + eye[1], dim=-1), atol=1e-5)
    # the baseline reading: each tile's global embedding with the text
    glob = tiled_hinted_vectors(model, encoding, eye[:2], text_weight=0.0, readout="global")
    assert torch.allclose(glob, encoding.global_embedding.view(2, 3, 8))
    with pytest.raises(ValueError, match="whole number of tiles"):
        tiled_product_vectors(model, encoding, images=4)


def test_containing_tile_zooms_only_where_the_box_fits():
    boxes = tile_boxes(2)  # tiles of side 0.571, at 0 and 0.429
    assert containing_tile((0.05, 0.05, 0.25, 0.3), boxes) == 1  # top left
    assert containing_tile((0.7, 0.6, 0.9, 0.95), boxes) == 4  # bottom right
    assert containing_tile((0.1, 0.1, 0.9, 0.9), boxes) == 0  # too large for a tile: the whole image
    # in the overlap the nearest tile centre wins
    assert containing_tile((0.45, 0.05, 0.55, 0.2), boxes) in (1, 2)
    assert containing_tile((0.44, 0.05, 0.5, 0.2), boxes) == 1 and containing_tile((0.5, 0.05, 0.56, 0.2), boxes) == 2


def test_best_match_is_the_maximum_over_a_query_s_vectors():
    vectors = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    scores = best_match_scores(vectors, gallery)
    assert scores.shape == (3, 7)
    for q in range(3):
        for g in range(7):
            assert scores[q, g] == pytest.approx(max(float(v @ gallery[g]) for v in vectors[q]))


def test_tiled_grounding_zooms_into_the_tile_holding_the_whole_image_box():
    torch.manual_seed(0)
    model = ECLIP(micro_config()).eval()
    images = torch.randn(4, 3, model.image_size, model.image_size)
    texts = model.encode_text(["a red tee", "a blue shoe", "a bag", "a green cap"])
    grounding = ground_tiled(model, images, texts, grid=2)
    whole = model.ground(images, texts)
    boxes, s = tile_boxes(2), model.image_size
    for b in range(4):
        t = containing_tile(whole.boxes[b], boxes)
        x0, y0, x1, y1 = boxes[t]
        box = grounding.boxes[b]
        assert x0 - 1e-6 <= box[0] <= box[2] <= x1 + 1e-6 and y0 - 1e-6 <= box[1] <= box[3] <= y1 + 1e-6
        outside = torch.ones(s, s, dtype=torch.bool)
        outside[round(y0 * s) : round(y1 * s), round(x0 * s) : round(x1 * s)] = False
        assert grounding.heatmaps[b].max() > 0.5 and (not outside.any() or grounding.heatmaps[b][outside].abs().max() == 0.0)
        if t == 0:  # nothing to zoom into: the untiled answer
            assert box == pytest.approx(whole.boxes[b], abs=1e-6)


@pytest.mark.parametrize("decoder", [True, False])
def test_tiled_evaluation_keeps_the_untiled_figures(scenes, clean_catalog, decoder):
    torch.manual_seed(0)
    model = ECLIP(micro_config(decoder=decoder))
    scene_products, _ = load_catalog(scenes)
    catalog_products, _ = load_catalog(clean_catalog)
    plain = evaluate_scenes(model, scene_products, catalog_products, batch_size=10, progress=False)
    tiled = evaluate_scenes(model, scene_products, catalog_products, batch_size=10, progress=False, tiles=2)
    for key, value in plain.items():  # the whole scene is tile 0 of the same pass
        assert tiled[key] == pytest.approx(value, abs=1e-5), key
    for key in ("scene_to_catalog_tiled_map10", "scene_to_catalog_tiled_hinted_r1", "scene_grounding_tiled_acc50",
                "scene_grounding_tiled_pointing", "by_area/>=25%/scene_to_catalog_tiled_r10"):
        assert 0.0 <= tiled[key] <= 1.0, key
    assert "scene_grounding_tiled_acc50_random_box" not in tiled
