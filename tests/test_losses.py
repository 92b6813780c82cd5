import math

import pytest
import torch
import torch.nn.functional as F

from eclip.config import LossConfig
from eclip.losses import ECLIPLoss, multi_positive_infonce, own_text_index, symmetric_infonce
from eclip.model import ECLIP, select_instances
from eclip.presets import objective_preset

from .conftest import micro_config


def test_infonce_single_positive_matches_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    positives = torch.tensor([[True, False, False], [False, True, False]])
    expected = F.cross_entropy(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(multi_positive_infonce(logits, positives), expected)


def test_infonce_multi_positive_by_hand():
    # one row, two positives among three columns, logits (1, 1, 0):
    # log_softmax = 1 - log(2e + 1) for the positives; target 1/2 each
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    positives = torch.tensor([[True, True, False]])
    expected = -(1 - math.log(2 * math.e + 1))
    assert multi_positive_infonce(logits, positives).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_skips_rows_without_positive_and_masked_entries():
    logits = torch.tensor([[float("-inf"), 1.0, 0.0], [3.0, 0.0, 0.0]])
    positives = torch.tensor([[False, True, False], [False, False, False]])
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0]
    torch.testing.assert_close(multi_positive_infonce(logits, positives), expected)


def test_symmetric_infonce_averages_both_directions():
    logits = torch.tensor([[1.0, 0.2], [0.1, 0.9], [0.3, 0.4]])
    positives = torch.tensor([[True, False], [False, True], [True, False]])
    a = multi_positive_infonce(logits, positives)
    b = multi_positive_infonce(logits.T, positives.T)
    torch.testing.assert_close(symmetric_infonce(logits, positives), (a + b) / 2)


def _features(model, encoding, texts) -> dict:
    """What `ECLIP.forward` returns, from an encoding and text embeddings."""
    return {
        "global_embedding": encoding.global_embedding,
        "instances": encoding.instances,
        "productness": encoding.productness,
        "texts": texts,
        **{f"scale_{name}": scale() for name, scale in model.logit_scales.items()},
    }


def test_criterion_reads_the_forward_features_not_the_model():
    torch.manual_seed(3)
    model = ECLIP(micro_config())
    images = torch.randn(4, 3, 32, 32)
    ids, mask = model.tokenizer(["red tee", "blue mug"])
    image_pids, text_pids = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])
    out = model(images, ids, mask)
    losses = ECLIPLoss(LossConfig())(out, image_pids, text_pids)
    assert set(losses) == {"global", "inter", "intra", "productness", "total"}
    # scales given apart replace the features' scale_* entries: doubling them changes the losses
    doubled = {name: 2 * out[f"scale_{name}"] for name in ("global", "inter", "intra")}
    assert not torch.allclose(ECLIPLoss(LossConfig())(out, image_pids, text_pids, doubled)["global"], losses["global"])
    # the inter objective scores with the selection rule it is given (the model's)
    soft = ECLIPLoss(LossConfig(), selection="softmax")(out, image_pids, text_pids)["inter"]
    hard = ECLIPLoss(LossConfig(), selection="max")(out, image_pids, text_pids)["inter"]
    torch.testing.assert_close(soft, losses["inter"])
    assert not torch.allclose(soft, hard)


def test_a_bad_loss_config_fails_when_the_criterion_is_built():
    config = LossConfig()
    config.intra_mode = "across"  # set past the constructor
    with pytest.raises(ValueError, match=r"LossConfig.intra_mode must be one of \('cross_image', 'within_image'\)"):
        ECLIPLoss(config)


def _batch(model, seed=0, products=4, k=2):
    torch.manual_seed(seed)
    images = torch.randn(products * k, 3, 32, 32)
    image_pids = torch.arange(products).repeat_interleave(k)
    text_pids = torch.arange(products)
    titles = [f"product number {i} red tee" for i in range(products)]
    encoding = model.encode_image(images)
    texts = model.encode_text(titles)
    return encoding, texts, image_pids, text_pids


@pytest.mark.parametrize("intra_mode", ["cross_image", "within_image"])
def test_same_product_pairs_are_never_negatives(intra_mode):
    """Raising the similarity of a same-product pair never raises any loss: the gradient of
    every objective with respect to a positive logit is <= 0."""
    torch.manual_seed(0)
    model = ECLIP(micro_config())
    criterion = ECLIPLoss(LossConfig(intra_mode=intra_mode))
    encoding, texts, image_pids, text_pids = _batch(model)
    # logits of the global objective: the gradient on positive pairs must be non-positive
    logits = (encoding.global_embedding @ texts.T).detach().requires_grad_(True)
    positives = image_pids[:, None] == text_pids[None, :]
    symmetric_infonce(logits * 10, positives).backward()
    assert (logits.grad[positives] <= 1e-7).all()
    assert (logits.grad[~positives] >= -1e-7).all()
    # image-image: two images of one product in the intra objective
    selected = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    sims = (selected @ selected.T).detach().requires_grad_(True)
    eye = torch.eye(8, dtype=torch.bool)
    same = (image_pids[:, None] == image_pids[None, :]) & ~eye
    multi_positive_infonce((10 * sims).masked_fill(eye, float("-inf")), same).backward()
    assert (sims.grad[same] <= 1e-7).all()
    losses = criterion(_features(model, encoding, texts), image_pids, text_pids)
    assert set(losses) == {"global", "inter", "intra", "productness", "total"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_total_is_weighted_sum_and_clip_preset_is_global_only():
    torch.manual_seed(1)
    model = ECLIP(micro_config())
    encoding, texts, image_pids, text_pids = _batch(model)
    cfg = LossConfig(global_weight=1.0, inter_weight=0.5, intra_weight=2.0, productness_weight=0.25)
    losses = ECLIPLoss(cfg)(_features(model, encoding, texts), image_pids, text_pids)
    expected = losses["global"] + 0.5 * losses["inter"] + 2.0 * losses["intra"] + 0.25 * losses["productness"]
    torch.testing.assert_close(losses["total"], expected)

    baseline = ECLIP(micro_config(decoder=False))
    enc_b, texts_b, _, _ = _batch(baseline)
    clip_losses = ECLIPLoss(objective_preset("clip"))(_features(baseline, enc_b, texts_b), image_pids, text_pids)
    assert set(clip_losses) == {"global", "total"}
    with pytest.raises(ValueError, match="instance decoder"):
        ECLIPLoss(objective_preset("eclip"))(_features(baseline, enc_b, texts_b), image_pids, text_pids)


def test_instance_objectives_ramp_in_over_their_warmup():
    assert LossConfig().instance_ramp(1) == 1.0  # no warm-up: full weights from the start
    cfg = LossConfig(inter_weight=0.5, instance_warmup_steps=10)
    assert [cfg.instance_ramp(s) for s in (1, 5, 10, 50)] == [0.1, 0.5, 1.0, 1.0]
    torch.manual_seed(2)
    model = ECLIP(micro_config())
    encoding, texts, image_pids, text_pids = _batch(model)
    criterion = ECLIPLoss(cfg)
    criterion.set_step(4)
    losses = criterion(_features(model, encoding, texts), image_pids, text_pids)
    instance = 0.5 * losses["inter"] + losses["intra"] + losses["productness"]
    torch.testing.assert_close(losses["total"], losses["global"] + 0.4 * instance)
    assert losses["inter"] > 0  # still computed (and logged) at full value


def test_productness_is_zero_when_it_matches_selection():
    torch.manual_seed(2)
    model = ECLIP(micro_config())
    encoding, texts, image_pids, text_pids = _batch(model)
    _, weights = model.select(encoding, texts)
    own = own_text_index(image_pids, text_pids)
    target = weights[torch.arange(len(own)), own].detach()
    encoding.productness = target.log()  # productness logits equal to the selection
    cfg = LossConfig(global_weight=0, inter_weight=0, intra_weight=0, productness_weight=1)
    loss = ECLIPLoss(cfg)(_features(model, encoding, texts), image_pids, text_pids)["productness"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_logit_scale_is_clamped():
    model = ECLIP(micro_config())
    with torch.no_grad():
        model.logit_scales["global"].log_scale.fill_(10.0)
    assert model.logit_scales["global"]().item() == pytest.approx(100.0)
    assert model.logit_scales["inter"]().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_own_text_index_requires_every_title():
    with pytest.raises(ValueError, match="title"):
        own_text_index(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_no_positive_anywhere_gives_zero_not_nan():
    """K=1 batches: the intra objective has no same-product pair, and its masked diagonal is
    -inf; the loss must be a finite zero that still back-propagates."""
    from eclip.losses import multi_positive_infonce

    logits = torch.randn(4, 4, requires_grad=True)
    masked = logits.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf"))
    loss = multi_positive_infonce(masked, torch.zeros(4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_the_intra_objective_contrasts_the_intra_heads_projections():
    """With `decoder.intra_head` the forward pass returns the instances through the head (unit
    vectors, one per instance); the intra objective is computed on them, the other objectives
    on the shared instances, exactly as if the projections were the instances."""
    torch.manual_seed(0)
    model = ECLIP(micro_config(intra_head=True))
    images = torch.randn(8, 3, 32, 32)
    ids, mask = model.tokenizer([f"product {i} red tee" for i in range(4)])
    image_pids, text_pids = torch.arange(4).repeat_interleave(2), torch.arange(4)
    out = model(images, ids, mask)
    projected = out["intra_instances"]
    assert projected.shape == out["instances"].shape
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(projected.shape[:2]))
    assert not torch.allclose(projected, out["instances"])

    criterion = ECLIPLoss(LossConfig())
    losses = criterion(out, image_pids, text_pids)
    shared = criterion({**out, "intra_instances": None}, image_pids, text_pids)
    for name in ("global", "inter", "productness"):
        torch.testing.assert_close(losses[name], shared[name])
    assert not torch.allclose(losses["intra"], shared["intra"])
    # by hand: the titles select among the shared instances, the selection pools the projections
    _, weights = select_instances(out["instances"], out["texts"], "softmax", 0.1)
    own = weights[torch.arange(8), own_text_index(image_pids, text_pids)].detach()
    expected = criterion.intra_product(projected, own, image_pids, out["scale_intra"])
    torch.testing.assert_close(losses["intra"], expected)
    # the head learns from the intra objective alone
    losses["intra"].backward()
    assert model.intra_head.fc1.weight.grad.abs().sum() > 0


def test_a_model_without_intra_head_returns_none_for_it():
    torch.manual_seed(0)
    model = ECLIP(micro_config())
    ids, mask = model.tokenizer(["red tee"])
    out = model(torch.randn(2, 3, 32, 32), ids, mask)
    assert out["intra_instances"] is None
    assert not hasattr(model, "intra_head")
