"""Parameter groups: weight decay, freezing, partial unfreezing, tower lr and layer decay."""

import pytest
import torch

from eclip.config import override
from eclip.model import ECLIP
from eclip.presets import model_preset
from eclip_app.optim import OptimConfig, parameter_groups
from eclip_app.train import load_train_config

from .conftest import micro_config


def _micro(depth: int = 3) -> ECLIP:
    config = micro_config()
    config.vision.depth = depth
    config.text.depth = depth
    return ECLIP(config)


def _lr_of(groups: list[dict], model: torch.nn.Module) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}


def _step(model: ECLIP, groups: list[dict]) -> None:
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    images = torch.randn(4, 3, model.image_size, model.image_size)
    encoding = model.encode_image(images)
    texts = model.encode_text(["a red dress", "blue shoes", "a bag", "a hat"])
    loss = (encoding.global_embedding @ texts.T).logsumexp(-1).mean() + encoding.instances.square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_default_groups_cover_every_parameter_once():
    model = _micro()
    groups = parameter_groups(model, 0.1, lr=1e-3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(g["lr"] == 1e-3 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_frozen_tower_is_unchanged_after_a_step_and_the_rest_moves():
    model = _micro()
    groups = parameter_groups(model, 0.1, 1e-2, OptimConfig(freeze_vision=True))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # exactly the trainable ones
    assert not any(p.requires_grad for p in model.vision.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, groups)
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param)
        if name.startswith("vision."):
            assert not moved, name
    assert not torch.equal(before["text.blocks.0.attn.q.weight"], model.text.blocks[0].attn.q.weight)
    assert not torch.equal(before["image_head.weight"], model.image_head.weight)


def test_partial_unfreezing_keeps_the_last_blocks_trainable():
    model = _micro(depth=3)
    parameter_groups(model, 0.1, 1e-3, OptimConfig(freeze_text=True, unfreeze_last_text_blocks=1))
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "norm.")) for n in trainable)
    assert {"norm.weight", "blocks.2.attn.q.weight"} <= trainable
    assert all(p.requires_grad for p in model.vision.parameters())


def test_layer_decay_gives_earlier_blocks_smaller_lr():
    model = _micro(depth=3)
    groups = parameter_groups(model, 0.1, 1.0, OptimConfig(tower_lr_scale=0.5, layer_decay=0.5))
    lr = _lr_of(groups, model)
    assert lr["vision.patch_embed.0.weight"] == pytest.approx(0.5 * 0.5**3)
    assert lr["vision.blocks.0.attn.q.weight"] == pytest.approx(0.5 * 0.5**2)
    assert lr["vision.blocks.2.attn.q.weight"] == pytest.approx(0.5)
    assert lr["vision.norm.weight"] == pytest.approx(0.5)  # with the last block
    assert lr["text.token_embed.weight"] == pytest.approx(0.5 * 0.5**3)
    assert lr["decoder.queries"] == lr["image_head.weight"] == 1.0  # not a tower: full lr
    assert [g["lr"] for g in groups if g["weight_decay"] > 0] == sorted((g["lr"] for g in groups if g["weight_decay"] > 0), reverse=True)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # an LR schedule scales each group from its own lr
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)
    assert sorted({round(g["lr"] / g["lr_scale"], 6) for g in optimizer.param_groups}) == [0.1]


def test_pretrained_tower_layers_timm_and_hf():
    """Layers of a timm CNN (stem 0, stage i -> i + 1, head norm with the last) drive unfreezing."""
    pytest.importorskip("timm")
    config = micro_config()
    config.vision = override(config, ['vision.kind="timm"', 'vision.model_name="test_efficientnet"', "vision.image_size=64"]).vision
    model = ECLIP(config)
    layers, n = model.vision.param_layers()
    assert layers["model.conv_stem.weight"] == 0 and layers["model.conv_head.weight"] == n
    groups = parameter_groups(model, 0.1, 1e-3, OptimConfig(freeze_vision=True, unfreeze_last_vision_blocks=1))
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert "model.conv_head.weight" in trainable and "model.conv_stem.weight" not in trainable
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    model.train()  # BatchNorms of frozen layers keep their statistics
    assert not model.vision.model.bn1.training and model.vision.model.bn2.training


def test_bad_optim_configs_are_refused():
    with pytest.raises(ValueError, match="needs freeze_vision"):
        parameter_groups(_micro(), 0.1, 1e-3, OptimConfig(unfreeze_last_vision_blocks=2))
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(_micro(), 0.1, 1e-3, OptimConfig(layer_decay=0.0))
    with pytest.raises(ValueError, match="base lr"):
        parameter_groups(_micro(), 0.1, None, OptimConfig(tower_lr_scale=0.1))


def test_train_config_carries_optim_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model_preset = "eclip-lite"\n[optim]\nfreeze_vision = true\nunfreeze_last_vision_blocks = 2\n')
    config = load_train_config(str(path), ["optim.tower_lr_scale=0.1", "optim.layer_decay=0.8"])
    assert config.optim == OptimConfig(0.1, True, False, 2, 0, 0.8)
    assert config.model == model_preset("eclip-lite")
