import json
import re

import numpy as np
import pytest
import torch

import eclip
from eclip.config import BoxRule, LossConfig, ModelConfig, from_dict, override, to_dict
from eclip.model import ECLIP, HashTokenizer, select_instances
from eclip.model.grounding import (
    box_by_rule,
    box_from_heatmap,
    box_iou,
    otsu_level,
    peak_point,
    upsample_heatmap,
)
from eclip.model.layers import sine_position_encoding_2d
from eclip.presets import model_preset

from .conftest import micro_config


def test_encode_image_shapes_and_normalisation():
    torch.manual_seed(0)
    model = ECLIP(micro_config()).eval()
    enc = model.encode_image(torch.randn(5, 3, 32, 32))
    assert enc.global_embedding.shape == (5, 16)
    assert enc.instances.shape == (5, 4, 16)
    assert enc.productness.shape == (5, 4)
    assert enc.attention.shape == (5, 4, 4, 4)
    assert enc.grid == (4, 4)
    torch.testing.assert_close(enc.global_embedding.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(enc.instances.norm(dim=-1), torch.ones(5, 4))


def test_attention_maps_are_distributions():
    torch.manual_seed(1)
    model = ECLIP(micro_config()).eval()
    attention = model.encode_image(torch.randn(3, 3, 32, 32)).attention
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.flatten(2).sum(-1), torch.ones(3, 4))


def test_text_padding_does_not_change_embedding():
    torch.manual_seed(2)
    model = ECLIP(micro_config()).eval()
    ids, mask = model.tokenizer(["red striped tee"])
    short = model.encode_text((ids, mask))
    # the same text in a longer context window: extra padding must be ignored by the mask
    wider = torch.zeros(1, 16, dtype=torch.long)
    wider[:, : ids.shape[1]] = ids
    torch.testing.assert_close(model.encode_text((wider, wider != 0)), short)


def test_tokenizer_is_deterministic_and_truncates():
    tok = HashTokenizer(vocab_size=100, context_length=6)
    ids, mask = tok(["Red STRIPED tee!", "a b c d e f g h"])
    again, _ = HashTokenizer(vocab_size=100, context_length=6)(["red striped tee"])
    assert torch.equal(ids[0], again[0])  # case and punctuation do not matter
    assert mask[1].all() and ids[1, -1].item() == 2  # truncated, still ends with EOS
    assert ids.max() < 100


def test_selection_softmax_and_max():
    instances = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    sims = torch.einsum("bmd,td->btm", instances, texts)
    scores, weights = select_instances(instances, texts, "max")
    torch.testing.assert_close(scores, sims.max(-1).values)
    assert torch.equal(weights.argmax(-1), sims.argmax(-1))
    soft, soft_w = select_instances(instances, texts, "softmax", temperature=0.1)
    torch.testing.assert_close(soft_w.sum(-1), torch.ones(2, 4))
    # a softmax-weighted mean lies between the min and the max similarity
    assert (soft <= scores + 1e-6).all() and (soft >= sims.min(-1).values - 1e-6).all()
    # a very low temperature approaches max selection
    sharp, _ = select_instances(instances, texts, "softmax", temperature=1e-4)
    torch.testing.assert_close(sharp, scores, atol=1e-4, rtol=0)


def test_product_embedding_follows_productness():
    torch.manual_seed(3)
    model = ECLIP(micro_config()).eval()
    with torch.no_grad():
        model.productness_head.weight.zero_()
        model.productness_head.bias.zero_()
    images = torch.randn(2, 3, 32, 32)
    enc = model.encode_image(images)
    # with flat productness the product embedding is the normalised mean of the instances
    expected = torch.nn.functional.normalize(enc.instances.mean(1), dim=-1)
    # the decoder alone (the default readout mixes in the global head)
    torch.testing.assert_close(model.product_embedding(images, readout="instance"), expected)


def test_readouts_of_product_embedding_and_scores(tmp_path):
    torch.manual_seed(4)
    model = ECLIP(micro_config()).eval()
    images = torch.randn(3, 3, 32, 32)
    texts = model.encode_text(["red tee", "blue mug", "green hat"])
    enc = model.encode_image(images)
    instance = model.product_embedding_from(enc, readout="instance")
    instance_scores = model.image_text_scores(enc, texts, readout="instance")
    torch.testing.assert_close(instance_scores, select_instances(enc.instances, texts, "softmax", 0.1)[0])
    guided = model.text_guided_embedding(enc, texts, readout="instance")  # image i guided by text i
    _, weights = select_instances(enc.instances, texts, "softmax", 0.1)
    expected = torch.nn.functional.normalize(torch.einsum("bm,bmd->bd", weights[[0, 1, 2], [0, 1, 2]], enc.instances), dim=-1)
    torch.testing.assert_close(guided, expected)

    torch.testing.assert_close(model.product_embedding_from(enc, readout="global"), enc.global_embedding)
    torch.testing.assert_close(model.image_text_scores(enc, texts, readout="global"), enc.global_embedding @ texts.T)
    torch.testing.assert_close(model.text_guided_embedding(enc, texts, readout="global"), enc.global_embedding)

    mixed = model.product_embedding_from(enc, readout="mix")
    torch.testing.assert_close(mixed, torch.nn.functional.normalize(instance + enc.global_embedding, dim=-1))
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(3))
    # the mix lies between its parts: closer to each than they are to each other
    assert ((mixed * instance).sum(-1) >= (instance * enc.global_embedding).sum(-1) - 1e-6).all()
    mixed_scores = (instance_scores + enc.global_embedding @ texts.T) / 2
    torch.testing.assert_close(model.image_text_scores(enc, texts, readout="mix"), mixed_scores)
    torch.testing.assert_close(
        model.text_guided_embedding(enc, texts, readout="mix"),
        torch.nn.functional.normalize(guided + enc.global_embedding, dim=-1),
    )
    # no argument: the config's readout ("mix" by default); the config is never changed
    assert model.config.readout == "mix"
    torch.testing.assert_close(model.product_embedding_from(enc), mixed)
    torch.testing.assert_close(model.image_text_scores(enc, texts), mixed_scores)
    torch.testing.assert_close(model.product_embedding(images, readout="global"), enc.global_embedding)
    assert model.config.readout == "mix"

    # saved with the model; a config written before the field reads the decoder alone
    eclip.save_model(model, tmp_path / "m")
    assert eclip.load_model(tmp_path / "m").config.readout == "mix"
    from eclip.config import from_dict, to_dict

    assert ModelConfig().readout == "mix"  # new models read both
    saved = to_dict(micro_config())
    del saved["readout"]  # a config.json written before the field: what that model served
    assert from_dict(ModelConfig, saved).readout == "instance"
    with pytest.raises(ValueError, match="readout"):
        ModelConfig(readout="average")
    # a bad argument names the allowed values, whichever method takes it
    for call in (
        lambda: model.product_embedding_from(enc, readout="average"),
        lambda: model.image_text_scores(enc, texts, readout="average"),
        lambda: model.text_guided_embedding(enc, texts, readout="average"),
        lambda: model.product_embedding(images, readout="average"),
    ):
        with pytest.raises(ValueError, match=r"readout must be one of \('instance', 'global', 'mix'\), not 'average'"):
            call()
    model.config.readout = "average"  # set past the constructor: caught where it is read
    with pytest.raises(ValueError, match="readout"):
        model.product_embedding_from(enc)


def test_baseline_reads_global_whatever_the_readout():
    model = ECLIP(micro_config(decoder=False)).eval()
    enc = model.encode_image(torch.randn(2, 3, 32, 32))
    texts = model.encode_text(["red tee"])
    for readout in ("instance", "global", "mix"):
        torch.testing.assert_close(model.product_embedding_from(enc, readout), enc.global_embedding)
        torch.testing.assert_close(model.image_text_scores(enc, texts, readout), enc.global_embedding @ texts.T)
    with pytest.raises(ValueError, match="readout"):
        model.image_text_scores(enc, texts, readout="instances")


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_memory_grad_scale_limits_what_instances_teach_the_vision_tower(scale):
    images = torch.randn(2, 3, 32, 32)

    def vision_grads(memory_grad_scale: float):
        torch.manual_seed(5)
        config = micro_config()
        config.decoder.memory_grad_scale = memory_grad_scale
        model = ECLIP(config)
        enc = model.encode_image(images)
        (enc.instances.square().sum() + enc.productness.sum()).backward()  # the decoder's outputs only
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.vision.parameters()]
        return enc.instances.detach(), grads

    full_instances, full = vision_grads(1.0)
    instances, scaled = vision_grads(scale)
    torch.testing.assert_close(instances, full_instances)  # the forward pass is unchanged
    assert sum(g.abs().sum() for g in full) > 0
    for a, b in zip(scaled, full):
        torch.testing.assert_close(a, scale * b)


def _token_instance_model(seed: int = 6) -> ECLIP:
    torch.manual_seed(seed)
    config = micro_config()
    config.decoder.instance_features = "tokens"
    return ECLIP(config)


def test_token_instances_are_attention_pooled_global_embeddings():
    model = _token_instance_model().eval()
    assert not hasattr(model, "instance_head")  # the image head projects the instances
    images = torch.randn(3, 3, 32, 32)
    enc = model.encode_image(images)
    assert enc.instances.shape == (3, 4, 16)
    features = model.vision.forward_features(images)
    by_hand = torch.einsum("bmn,bnc->bmc", enc.attention.flatten(2), features.tokens)
    expected = torch.nn.functional.normalize(model.image_head(by_hand), dim=-1)
    torch.testing.assert_close(enc.instances, expected)
    # attention with equal logits everywhere pools the tokens' mean: the global embedding
    with torch.no_grad():
        last = model.decoder.layers[-1].cross_attn
        last.k.weight.zero_()
        last.k.bias.zero_()
    enc = model.encode_image(images)
    torch.testing.assert_close(enc.attention.flatten(2), torch.full((3, 4, 16), 1 / 16))
    for m in range(4):
        torch.testing.assert_close(enc.instances[:, m], enc.global_embedding)


def test_token_instances_teach_the_decoder_where_to_look():
    from eclip.config import LossConfig
    from eclip.losses import ECLIPLoss

    model = _token_instance_model()
    images = torch.randn(4, 3, 32, 32)
    enc = model.encode_image(images)
    texts = model.encode_text(["red tee", "blue mug"])
    pids = torch.tensor([0, 0, 1, 1])
    features = {"global_embedding": enc.global_embedding, "instances": enc.instances, "productness": enc.productness, "texts": texts}
    scales = {name: scale() for name, scale in model.logit_scales.items()}
    losses = ECLIPLoss(LossConfig(global_weight=0.0, intra_weight=0.0, productness_weight=0.0))(features, pids, torch.tensor([0, 1]), scales)
    losses["total"].backward()
    # the inter objective reaches the queries only through the attention that pools the tokens
    assert model.decoder.queries.grad.abs().sum() > 0
    assert model.decoder.layers[-1].cross_attn.k.weight.grad.abs().sum() > 0
    assert model.image_head.weight.grad.abs().sum() > 0


def test_grounding_map_similarity_grounds_a_decoder_model_like_the_baseline():
    from eclip.config import TOKEN_SIMILARITY_BOX_RULE

    model = _token_instance_model().eval()
    assert model.config.box_rule("similarity") == TOKEN_SIMILARITY_BOX_RULE
    images = torch.randn(2, 3, 32, 32)
    texts = ["red tee", "blue mug"]
    grounding = model.ground(images, texts, grounding_map="similarity")
    assert grounding.query_index is None
    enc, t = model.encode_image(images), model.encode_text(texts)
    tokens = torch.nn.functional.normalize(model.image_head(enc.tokens), dim=-1)
    maps, _ = model.heatmaps_from(enc, t, grounding_map="similarity")
    torch.testing.assert_close(maps, torch.einsum("bnd,bd->bn", tokens, t).unflatten(-1, enc.grid))
    # the boxes follow the map asked for: the similarity map's rule, not the config's
    heatmaps = upsample_heatmap(maps.detach(), (32, 32))
    torch.testing.assert_close(grounding.heatmaps, heatmaps)
    assert grounding.boxes == [box_by_rule(h.numpy(), TOKEN_SIMILARITY_BOX_RULE) for h in heatmaps]
    # the attention map (the config's default) is another map, with the selected query's index
    assert model.config.grounding_map == "attention"
    attention_maps, index = model.heatmaps_from(enc, t)
    assert index is not None and not torch.allclose(attention_maps, maps)
    torch.testing.assert_close(model.heatmaps_from(enc, t, "attention")[0], attention_maps)
    assert model.ground(images, texts).query_index is not None
    with pytest.raises(ValueError, match="grounding_map"):
        ModelConfig(grounding_map="peak")
    for call in (
        lambda: model.heatmaps_from(enc, t, grounding_map="peak"),
        lambda: model.ground(images, texts, grounding_map="peak"),
        lambda: model.box_from_heatmap(heatmaps[0].numpy(), grounding_map="peak"),
    ):
        with pytest.raises(ValueError, match=r"grounding_map must be one of \('attention', 'similarity', 'contribution'\)"):
            call()


def test_contribution_map_decomposes_the_token_instance_score():
    from eclip.config import CONTRIBUTION_BOX_RULE

    model = _token_instance_model().eval()
    assert model.config.box_rule("contribution") == CONTRIBUTION_BOX_RULE
    images = torch.randn(2, 3, 32, 32)
    enc, t = model.encode_image(images), model.encode_text(["red tee", "blue mug"])
    maps, index = model.heatmaps_from(enc, t, grounding_map="contribution")
    # summed over the tokens, the map is the selected instance's score before its normalisation
    pooled = torch.einsum("bn,bnc->bc", enc.attention[torch.arange(2), index].flatten(1), enc.tokens)
    raw = model.image_head(pooled)  # (B, D)
    torch.testing.assert_close(maps.flatten(1).sum(-1), (raw * t).sum(-1))
    selected = enc.instances[torch.arange(2), index]
    torch.testing.assert_close((raw * t).sum(-1) / raw.norm(dim=-1), (selected * t).sum(-1))


def test_unknown_instance_features_is_an_error():
    config = micro_config()
    config.decoder.instance_features = "hidden"
    with pytest.raises(ValueError, match="instance_features"):
        ECLIP(config)


def test_baseline_has_no_decoder_and_grounds_with_tokens():
    model = ECLIP(micro_config(decoder=False)).eval()
    assert model.decoder is None
    images = torch.randn(2, 3, 32, 32)
    enc = model.encode_image(images)
    assert enc.instances is None and enc.attention is None
    torch.testing.assert_close(model.product_embedding(images), enc.global_embedding)
    g = model.ground(images, ["red tee", "blue mug"])
    assert g.heatmaps.shape == (2, 32, 32) and g.query_index is None
    for box in g.boxes:
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    # it has no attention: any map asked for is the similarity map
    for name in ("attention", "contribution"):
        torch.testing.assert_close(model.ground(images, ["red tee", "blue mug"], name).heatmaps, g.heatmaps)


def test_box_from_heatmap_picks_largest_region():
    heat = torch.zeros(20, 20)
    heat[2:5, 2:5] = 1.0  # 9 pixels at the peak
    heat[10:18, 8:16] = 0.9  # 64 pixels, above half the peak
    box = box_from_heatmap(heat.numpy())
    assert box == pytest.approx((8 / 20, 10 / 20, 16 / 20, 18 / 20))
    assert box_iou(box, box) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0


def _peaked_product_map():
    """A min-max map as ECLIP's attention looks after training: a peak on a part of the product,
    a low tail over the rest of it, a fainter distractor elsewhere, zero background."""
    heat = torch.zeros(32, 32)
    heat[8:24, 6:20] = 0.15  # the product: 16 x 14 pixels
    heat[10:13, 8:11] = 1.0  # the part the attention peaks on
    heat[26:30, 24:28] = 0.12  # a small distractor, above the mean too
    return heat.numpy()


def test_box_rule_peak_region_boxes_the_small_product_the_map_peaks_on():
    """A small product with the peak beside a larger, weaker blob (a distractor): "largest"
    boxes the distractor, "peak" the product."""
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[4:10, 4:10] = 0.6  # the small product, where the map peaks
    heat[6, 6] = 1.0
    heat[16:30, 14:30] = 0.3  # a large distractor, kept by the same threshold
    assert box_from_heatmap(heat, 1.0, "mean", "largest") == pytest.approx((14 / 32, 16 / 32, 30 / 32, 30 / 32))
    assert box_from_heatmap(heat, 1.0, "mean", "peak") == pytest.approx((4 / 32, 4 / 32, 10 / 32, 10 / 32))
    with pytest.raises(ValueError, match="largest, peak or union"):
        box_from_heatmap(heat, 1.0, "mean", "biggest")


def test_box_rule_mass_keeps_the_highest_pixels_holding_a_share():
    """"mass": the fewest highest pixels holding the share; a peaked map keeps a tight box where
    a mean threshold spreads, and a spread map keeps a wide one."""
    heat = np.full((32, 32), 0.02, dtype=np.float32)
    heat[10:14, 10:14] = 1.0  # 16 pixels hold 16 / (16 + 1008 * 0.02) = 0.44 of the sum
    assert box_from_heatmap(heat, 0.4, "mass") == pytest.approx((10 / 32, 10 / 32, 14 / 32, 14 / 32))
    assert box_from_heatmap(heat, 0.9, "mass") == (0.0, 0.0, 1.0, 1.0)  # the rest is needed too
    spread = np.zeros((32, 32), dtype=np.float32)
    spread[4:28, 2:30] = 0.5
    assert box_from_heatmap(spread, 0.5, "mass") == pytest.approx((2 / 32, 4 / 32, 30 / 32, 28 / 32))
    assert box_from_heatmap(np.zeros((8, 8), dtype=np.float32), 0.5, "mass") == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at most 1"):
        BoxRule("mass", 1.5)


def test_peak_point_is_the_middle_of_a_plateau_whatever_the_rounding():
    """A corner token upsampled bilinearly is a flat block: its peak point is the block's
    middle, and noise at rounding level does not move it; a single-pixel peak is that pixel."""
    tokens = torch.zeros(1, 4, 4)
    tokens[0, 0, 3] = 1.0  # the top-right token
    heat = upsample_heatmap(tokens, (32, 32))[0].numpy()
    plateau = heat >= heat.max() - 1e-6
    assert plateau.sum() > 1
    ys, xs = np.nonzero(plateau)
    expected = ((xs.mean() + 0.5) / 32, (ys.mean() + 0.5) / 32)
    assert peak_point(heat) == pytest.approx(expected) and expected[0] > 0.9 and expected[1] < 0.1
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert peak_point(heat + rng.uniform(0, 1e-8, heat.shape).astype(np.float32)) == pytest.approx(expected)
    single = np.zeros((10, 20), dtype=np.float32)
    single[3, 7] = 1.0
    assert peak_point(single) == pytest.approx((7.5 / 20, 3.5 / 10))


def test_otsu_level_splits_two_classes_and_tracks_the_map():
    """Otsu's level falls between a bimodal map's two levels, whatever their shares, and
    agrees with the exhaustive search for the split of least within-class variance."""
    for share in (0.05, 0.3, 0.7):
        values = np.full(1000, 0.1)
        values[: int(share * 1000)] = 0.8
        assert 0.1 < otsu_level(values) <= 0.8
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(0.7, 0.08, 300)]).clip(0, 1)
    candidates = np.unique(values)[1:]

    def within(level):
        low, high = values[values < level], values[values >= level]
        return low.size * low.var() + high.size * high.var()

    best = candidates[int(np.argmin([within(c) for c in candidates]))]
    assert within(otsu_level(values)) <= within(best) * 1.01
    assert otsu_level(np.full(16, 0.4)) == 0.4  # constant: its value, so every pixel is kept


def test_box_rule_otsu_adapts_to_the_product_size():
    """"otsu": one rule boxes a small product tightly and a large one whole, where any single
    multiple of the mean boxes one of them wrongly."""
    small = np.full((40, 40), 0.05, dtype=np.float32)
    small[4:12, 4:12] = 1.0  # a product 4 % of the area
    small[20:36, 20:36] = 0.25  # faint clutter, above the mean
    large = np.full((40, 40), 0.05, dtype=np.float32)
    large[4:36, 6:34] = 0.55  # a product 56 % of the area, peaked on a part
    large[10:16, 10:16] = 1.0
    assert box_from_heatmap(small, 1.0, "otsu") == pytest.approx((4 / 40, 4 / 40, 12 / 40, 12 / 40))
    assert box_from_heatmap(large, 1.0, "otsu") == pytest.approx((6 / 40, 4 / 40, 34 / 40, 36 / 40))
    # the mean's multiples: one that boxes the large product whole boxes the clutter beside the
    # small one, and one high enough to drop the clutter boxes only the large product's peak
    assert box_from_heatmap(large, 1.0, "mean") == pytest.approx((6 / 40, 4 / 40, 34 / 40, 36 / 40))
    assert box_from_heatmap(small, 1.0, "mean") == pytest.approx((20 / 40, 20 / 40, 36 / 40, 36 / 40))
    assert box_from_heatmap(small, 2.1, "mean") == pytest.approx((4 / 40, 4 / 40, 12 / 40, 12 / 40))
    assert box_from_heatmap(large, 2.1, "mean") == pytest.approx((10 / 40, 10 / 40, 16 / 40, 16 / 40))
    # a higher multiple of the level keeps less
    assert box_from_heatmap(large, 2.0, "otsu") == pytest.approx((10 / 40, 10 / 40, 16 / 40, 16 / 40))
    with pytest.raises(ValueError, match="otsu"):
        box_from_heatmap(large, 1.0, "median")


def test_box_rule_above_mean_boxes_the_product_not_its_peak():
    heat = _peaked_product_map()
    product = (6 / 32, 8 / 32, 20 / 32, 24 / 32)
    # the half-maximum rule boxes the peaked part only
    assert box_from_heatmap(heat) == pytest.approx((8 / 32, 10 / 32, 11 / 32, 13 / 32))
    # above the mean, largest region: the whole product, not the distractor
    assert box_from_heatmap(heat, 1.0, "mean", "largest") == pytest.approx(product)
    # union of every kept pixel reaches the distractor
    assert box_from_heatmap(heat, 1.0, "mean", "union") == pytest.approx((6 / 32, 8 / 32, 28 / 32, 30 / 32))
    with pytest.raises(ValueError):
        box_from_heatmap(heat, 1.0, "median")
    # a model applies its config's rule: the decoder's default is above the mean
    model = ECLIP(micro_config()).eval()
    assert model.box_from_heatmap(heat) == pytest.approx(product)
    baseline = ECLIP(micro_config(decoder=False)).eval()
    assert baseline.config.box_rule() == BoxRule(relative_to="max", threshold=0.8, region="union")
    assert baseline.box_from_heatmap(heat) == pytest.approx((8 / 32, 10 / 32, 11 / 32, 13 / 32))


def test_box_rule_is_configurable_and_old_configs_load(tmp_path):
    from eclip.config import from_dict, to_dict

    config = micro_config()
    saved = to_dict(config)
    assert saved["box"] is None
    del saved["box"]  # a config.json written before the field existed
    old = from_dict(ModelConfig, saved)
    assert old.box is None and old.box_rule() == BoxRule("mean", 1.0, "largest")
    half_max = BoxRule(relative_to="max", threshold=0.5, region="largest")
    config.box = half_max
    model = ECLIP(config).eval()
    assert model.box_from_heatmap(_peaked_product_map()) == pytest.approx((8 / 32, 10 / 32, 11 / 32, 13 / 32))
    eclip.save_model(model, tmp_path / "m")
    assert eclip.load_model(tmp_path / "m").config.box_rule() == half_max
    # a command-line override sets a plain dict
    assert override(micro_config(), ['box={"relative_to": "max", "threshold": 0.5}']).box_rule() == half_max


def test_sine_encoding_distinguishes_positions():
    pos = sine_position_encoding_2d(4, 5, 16)
    assert pos.shape == (20, 16)
    assert torch.cdist(pos, pos).add(torch.eye(20)).min() > 1e-3  # every cell differs


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    model = ECLIP(micro_config()).eval()
    eclip.save_model(model, tmp_path / "m")
    loaded = eclip.load_model(tmp_path / "m")
    assert loaded.config == model.config
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.product_embedding(images), model.product_embedding(images))
    torch.testing.assert_close(loaded.encode_text(["a red tee"]), model.encode_text(["a red tee"]))
    # overwriting is atomic: the folder holds one complete model afterwards
    eclip.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_models_saved_with_scalar_logit_scales_still_load(tmp_path):
    """Logit scales are (1,) now (FSDP2 shards along dim 0); models saved as () still load."""
    from safetensors.torch import load_file, save_file

    model = ECLIP(micro_config())
    with torch.no_grad():
        model.logit_scales["inter"].log_scale.fill_(2.5)
    eclip.save_model(model, tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    old = {k: (v.reshape(()) if k.endswith("log_scale") else v) for k, v in weights.items()}
    save_file(old, str(tmp_path / "m" / "model.safetensors"))
    loaded = eclip.load_model(tmp_path / "m")
    assert loaded.logit_scales["inter"].log_scale.shape == (1,)
    assert loaded.logit_scales["inter"]().item() == pytest.approx(torch.tensor(2.5).exp().item())


def test_load_rejects_mismatched_weights(tmp_path):
    eclip.save_model(ECLIP(micro_config()), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config_path.write_text(config_path.read_text().replace('"num_queries": 4', '"num_queries": 6'))
    with pytest.raises(ValueError, match="do not fit"):
        eclip.load_model(tmp_path / "m")


def test_presets_and_overrides():
    config = override(model_preset("tiny"), ["decoder.num_queries=16", "selection=max", "vision.depth=2"])
    assert config.decoder.num_queries == 16 and config.selection == "max" and config.vision.depth == 2
    assert model_preset("tiny").decoder.num_queries == 8  # presets are fresh copies
    assert model_preset("tiny", "clip").decoder is None
    with pytest.raises(ValueError, match="no field"):
        override(config, ["decoder.nope=1"])
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("huge")
    model = eclip.create_model("tiny", overrides=["decoder.num_queries=5"])
    assert model.decoder.queries.shape[0] == 5
    convnet = eclip.create_model("tiny-convnet").eval()
    encoding = convnet.encode_image(torch.randn(2, 3, 64, 64))
    assert encoding.grid == model.encode_image(torch.randn(2, 3, 64, 64)).grid == (8, 8)
    assert encoding.attention.shape == (2, 8, 8, 8)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("grounding_map=bad", r"ModelConfig.grounding_map must be one of \('attention', 'similarity', 'contribution'\), not 'bad'"),
        ("readout=both", r"ModelConfig.readout must be one of \('instance', 'global', 'mix'\)"),
        ("selection=argmax", r"ModelConfig.selection must be one of \('softmax', 'max'\)"),
        ("vision.stem=conv3", r"VisionConfig.stem must be one of \('conv', 'patch'\)"),
        ("vision.stem_norm=batch", r"VisionConfig.stem_norm must be one of \('channel', 'group'\)"),
        ("decoder.instance_features=hidden", r"DecoderConfig.instance_features must be one of \('decoder', 'tokens'\)"),
        ('box={"region": "all"}', r"BoxRule.region must be one of \('largest', 'union', 'peak'\)"),
        ("vision.depth=abc", r"VisionConfig.depth must be an integer, not 'abc'"),
        ("vision.depth=2.5", r"VisionConfig.depth must be an integer, not 2.5"),
        ("selection_temperature=fast", r"ModelConfig.selection_temperature must be a number, not 'fast'"),
        ("decoder.memory_grad_scale=true", r"DecoderConfig.memory_grad_scale must be a number, not True"),
        ("vision.kind=3", r"VisionConfig.kind must be a string, not 3"),
        ("decoder=7", r"ModelConfig.decoder must be a DecoderConfig or None, not 7"),
    ],
)
def test_bad_config_values_fail_up_front_naming_the_field(assignment, message):
    with pytest.raises(ValueError, match=re.escape(f"override {assignment!r}: ") + message):
        override(model_preset("tiny"), [assignment])
    key, value = assignment.split("=", 1)
    if "." not in key and key != "box":  # the same value from a saved config.json
        saved = to_dict(model_preset("tiny"))
        saved[key] = json.loads(value) if value[0] in '{"0123456789t' else value
        with pytest.raises(ValueError, match=message):
            from_dict(ModelConfig, saved)


def test_config_checks_types_on_load_and_keeps_old_configs_loading():
    saved = to_dict(model_preset("eclip-lite"))
    saved["vision"]["registers"] = "4"
    with pytest.raises(ValueError, match=r"VisionConfig.registers must be an integer, not '4'"):
        from_dict(ModelConfig, saved)
    loss = to_dict(LossConfig())
    loss["intra_detach_selection"] = 1  # a bool field takes true/false only
    with pytest.raises(ValueError, match=r"LossConfig.intra_detach_selection must be true or false, not 1"):
        from_dict(LossConfig, loss)
    with pytest.raises(ValueError, match=r"LossConfig.intra_mode must be one of"):
        override(LossConfig(), ["intra_mode=both"])
    # an int given for a float is a float (JSON writes 4.0 as 4); tower kinds stay open
    config = from_dict(ModelConfig, {**to_dict(ModelConfig()), "max_logit_scale": 50, "vision": {"kind": "my_tower"}})
    assert config.max_logit_scale == 50.0 and isinstance(config.max_logit_scale, float)
    assert config.vision.kind == "my_tower"
    # a config saved before readout and box were fields still loads, as what it served
    old = to_dict(model_preset("tiny"))
    del old["readout"], old["box"]
    assert from_dict(ModelConfig, old).readout == "instance"
    # overrides that are right still apply, and a bool accepts JSON true/false
    assert override(LossConfig(), ["intra_detach_selection=false", "global_weight=2"]).global_weight == 2.0


@pytest.mark.parametrize("memory_level", [0, 1, -1])
@pytest.mark.parametrize("registers", [0, 3])
def test_decoder_memory_levels_and_registers(memory_level, registers):
    config = override(micro_config(), [f"decoder.memory_level={memory_level}", f"decoder.registers={registers}", f"vision.registers={registers}"])
    model = ECLIP(config).eval()
    enc = model.encode_image(torch.randn(2, 3, 32, 32))
    # maps cover the image tokens only (registers excluded) and stay distributions
    assert enc.attention.shape == (2, 4, 4, 4)
    torch.testing.assert_close(enc.attention.flatten(2).sum(-1), torch.ones(2, 4))


def test_vision_levels_are_per_block_tokens():
    model = ECLIP(override(micro_config(), ["vision.stem_norm=channel"])).eval()
    features = model.vision.forward_features(torch.randn(2, 3, 32, 32))
    assert len(features.levels) == 1 + model.config.vision.depth
    assert all(level.shape == features.tokens.shape for level in features.levels)
    assert features.level(-1) is features.tokens
    # the stem level does not depend on any other position: change one corner, others stay
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., :8, :8] += 1.0
    a = model.vision.forward_features(images).level(0)
    b = model.vision.forward_features(changed).level(0)
    assert not torch.allclose(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, -1], b[:, -1])


def test_local_blocks_keep_tokens_local():
    """With local blocks, a token at that depth ignores far-away pixels; a global block does not."""
    torch.manual_seed(5)
    config = override(micro_config(), ["vision.stem_norm=channel", "vision.depth=2", "vision.local_blocks=1", "vision.local_radius=1", "vision.registers=2"])
    model = ECLIP(config).eval()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., :8, :8] += 1.0  # the top-left patch only
    a = model.vision.forward_features(images)
    b = model.vision.forward_features(changed)
    # after the local block: the bottom-right token (3, 3) is more than one token away
    torch.testing.assert_close(a.level(1)[:, -1], b.level(1)[:, -1])
    assert not torch.allclose(a.level(1)[:, 0], b.level(1)[:, 0])
    # after the global block it sees the change
    assert not torch.allclose(a.level(2)[:, -1], b.level(2)[:, -1])


def test_level_of_a_tower_without_levels_is_an_error():
    from eclip.model.towers import VisionFeatures

    features = VisionFeatures(pooled=torch.zeros(1, 4), tokens=torch.zeros(1, 4, 4), grid=(2, 2))
    assert features.level(-1) is features.tokens
    with pytest.raises(ValueError, match="level 2"):
        features.level(2)


def test_convnet_tower_has_the_vit_interface(tmp_path):
    """The ConvNeXt-style tower plugs in where the ViT does: tokens, grid, per-block levels, a
    decoder reading an intermediate level, attention maps that are distributions, save/load."""
    torch.manual_seed(7)
    config = override(micro_config(), ["vision.kind=convnet", "vision.depth=2", "decoder.memory_level=1"])
    model = ECLIP(config).eval()
    images = torch.randn(3, 3, 32, 32)
    enc = model.encode_image(images)
    assert enc.grid == (4, 4) and enc.tokens.shape == (3, 16, 32)
    assert enc.instances.shape == (3, 4, 16) and enc.attention.shape == (3, 4, 4, 4)
    torch.testing.assert_close(enc.attention.flatten(2).sum(-1), torch.ones(3, 4))
    features = model.vision.forward_features(images)
    assert len(features.levels) == 1 + 2 and all(level.shape == (3, 16, 32) for level in features.levels)
    _, blocks = model.vision.param_layers()
    assert blocks == 2
    eclip.save_model(model, tmp_path / "m")
    again = eclip.load_model(tmp_path / "m")
    torch.testing.assert_close(again.encode_image(images).instances, enc.instances)


def test_convnet_tokens_stay_local_for_a_block():
    """A token after one 5x5 depthwise block sees two tokens around it: a change in the top-left
    patch reaches the token next to it, not the far corner of an 8 x 8 grid (with the
    per-position stem norm)."""
    torch.manual_seed(8)
    config = override(micro_config(), ["vision.kind=convnet", "vision.stem_norm=channel", "vision.depth=2", "vision.image_size=64"])
    model = ECLIP(config).eval()
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[..., :8, :8] += 1.0
    a = model.vision.forward_features(images).level(1)
    b = model.vision.forward_features(changed).level(1)
    assert not torch.allclose(a[:, 1], b[:, 1])  # the neighbour of the changed patch
    torch.testing.assert_close(a[:, 63], b[:, 63])  # the opposite corner
