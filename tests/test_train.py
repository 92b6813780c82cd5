import json
import math

import pytest
import torch
from safetensors.torch import load_file

from eclip import load_model
from eclip.config import LossConfig
from eclip.data import load_catalog
from eclip.evaluation import evaluate
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP
from eclip_app.train import (
    list_checkpoints,
    load_train_config,
    make_train_config,
    parameter_groups,
    train,
    warmup_cosine,
)

from .conftest import micro_config


def _config(catalog, out, steps, objective="eclip", **fields):
    config = make_train_config("tiny", objective, catalog=str(catalog), out_dir=str(out), steps=steps, warmup_steps=2,
                               products_per_batch=6, images_per_product=2, checkpoint_every=3, log_every=1, **fields)
    config.model = micro_config(decoder=objective != "clip")
    return config


@pytest.mark.parametrize("instance_warmup", [0, 5])
def test_resume_equals_straight_run(synth_catalog, tmp_path, instance_warmup):
    """N steps, a stop, a resume to 2N: the same weights and log as 2N steps straight (also
    when the stop falls inside the instance objectives' warm-up)."""
    straight_config = _config(synth_catalog["train"], tmp_path / "a", 6)
    straight_config.loss.instance_warmup_steps = instance_warmup
    straight = train(straight_config, progress=False)
    config = _config(synth_catalog["train"], tmp_path / "b", 6)
    config.loss.instance_warmup_steps = instance_warmup
    train(config, progress=False, stop_at=3)  # as if killed right after the step-3 checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "step_00000003"
    resumed = train(config, resume=True, progress=False)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [r["loss_total"] for r in log] == pytest.approx([r["loss_total"] for r in straight.history], rel=1e-4)
    if instance_warmup:
        assert [r["instance_ramp"] for r in log] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_checkpoints_are_complete_and_pruned(synth_catalog, tmp_path):
    config = _config(synth_catalog["train"], tmp_path / "run", 7, keep_checkpoints=2)
    train(config, progress=False)
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step_00000006", "step_00000007"]
    for folder in kept:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]
        state = torch.load(folder / "train_state.pt", weights_only=True)  # no pickle of objects
        assert state["step"] == int(folder.name.split("_")[1]) == state["sampler"]["step"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    weights = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert "decoder.queries" in weights


def test_parameter_groups_exempt_norms_biases_queries_and_scales():
    from eclip.model import ECLIP

    model = ECLIP(micro_config())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "decoder.queries" in exempt and "logit_scales.global.log_scale" in exempt
    assert "vision.norm.weight" in exempt and "text_head.weight" not in exempt
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_train_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('objective = "clip"\nsteps = 42\n[loss]\nglobal_weight = 2.0\n')
    config = load_train_config(str(path), ["lr=0.01", "products_per_batch=8"])
    assert config.objective == "clip" and config.model.decoder is None
    assert config.steps == 42 and config.loss.global_weight == 2.0 and config.loss.inter_weight == 0.0
    assert config.lr == 0.01 and config.products_per_batch == 8
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"model": {"decoder": {"num_queries": 3}}}))
    assert load_train_config(str(json_path)).model.decoder.num_queries == 3
    with pytest.raises(ValueError, match="no field"):
        load_train_config(None, ["stepz=3"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-convnet"])
def test_short_training_learns_and_grounds(synth_catalog, tmp_path, preset):
    """A few hundred steps of a tiny preset (the ViT, and the ConvNet the demo uses) on a small
    ShopSynth: the loss falls, and the selected query's box and peak beat a random box and a
    random point."""
    config = make_train_config(preset, "eclip", catalog=str(synth_catalog["train"]), out_dir=str(tmp_path / "e2e"),
                               steps=250, warmup_steps=20, products_per_batch=12, images_per_product=3,
                               checkpoint_every=1000, log_every=10)
    result = train(config, progress=False)
    losses = [r["loss_total"] for r in result.history]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    products, _ = load_catalog(synth_catalog["train"])
    metrics = evaluate(result.model, products, progress=False)
    grounding = {k: round(v, 3) for k, v in metrics.items() if k.startswith("grounding")}
    assert metrics["grounding_mean_iou"] > metrics["grounding_mean_iou_random_box"] + 0.03, grounding
    assert metrics["grounding_pointing"] > metrics["grounding_pointing_random"] + 0.1, grounding


def test_grad_clip_zero_turns_clipping_off(synth_catalog, tmp_path):
    """grad_clip=0 means no clipping (not a zero gradient): the same run as an unreachable limit."""
    free = train(_config(synth_catalog["train"], tmp_path / "a", 3, grad_clip=0.0), progress=False)
    unreachable = train(_config(synth_catalog["train"], tmp_path / "b", 3, grad_clip=1e9), progress=False)
    clipped = train(_config(synth_catalog["train"], tmp_path / "c", 3, grad_clip=1e-3), progress=False)
    assert free.history[0]["grad_norm"] > 1e-2  # the norm before clipping is still logged
    losses = [[r["loss_total"] for r in run.history] for run in (free, unreachable, clipped)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[0][-1] != pytest.approx(losses[2][-1], rel=1e-4)


def test_an_intra_head_trains_and_is_saved_with_the_model(synth_catalog, tmp_path):
    """`decoder.intra_head`: steps on one batch lower the intra objective it carries, and a
    training run saves the head's weights with the model (and loads them back)."""
    torch.manual_seed(0)
    model = ECLIP(micro_config(intra_head=True))
    criterion = ECLIPLoss(LossConfig(global_weight=0.0, inter_weight=0.0, productness_weight=0.0))
    images = torch.randn(8, 3, 32, 32)
    ids, mask = model.tokenizer([f"product {i} red tee" for i in range(4)])
    image_pids, text_pids = torch.arange(4).repeat_interleave(2), torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    intra = []
    for _ in range(30):
        loss = criterion(model(images, ids, mask), image_pids, text_pids)["intra"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        intra.append(loss.item())
    assert sum(intra[-3:]) / 3 < 0.5 * sum(intra[:3]) / 3, intra

    config = _config(synth_catalog["train"], tmp_path / "head", 3)
    config.model = micro_config(intra_head=True)
    result = train(config, progress=False)
    assert all(math.isfinite(r["loss_intra"]) for r in result.history)
    weights = load_file(str(tmp_path / "head" / "model" / "model.safetensors"))
    assert any(name.startswith("intra_head.") for name in weights)
    loaded = load_model(tmp_path / "head" / "model", device="cpu")
    torch.testing.assert_close(loaded.intra_head.fc1.weight, result.model.intra_head.fc1.weight)
