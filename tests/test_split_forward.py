"""The towers' split forward: `forward_features_from(forward_frozen(x, k), k)` is the whole
forward for every k, and k = `frozen_prefix_length` covers exactly what freezing freezes.
Built-in towers here; the open_clip, timm and Hugging Face towers in tests/test_towers.py."""

import pytest
import torch

from eclip.config import TextConfig, VisionConfig, override
from eclip.model import ECLIP
from eclip.model.towers import build_text_tower, build_vision_tower, frozen_prefix_length
from eclip_app.optim import OptimConfig, apply_freezing, frozen_prefix

from .conftest import micro_config


def assert_split_vision_matches(tower, images: torch.Tensor) -> None:
    """For every k: pooled, tokens and grid equal; the levels from k - 1 on equal, the earlier
    ones absent."""
    tower.eval()
    with torch.no_grad():
        full = tower.forward_features(images)
        for k in range(tower.num_layers + 1):
            split = tower.forward_features_from(tower.forward_frozen(images, k), k)
            torch.testing.assert_close(split.pooled, full.pooled, rtol=0, atol=1e-5, msg=f"pooled, k={k}")
            torch.testing.assert_close(split.tokens, full.tokens, rtol=0, atol=1e-5, msg=f"tokens, k={k}")
            assert split.grid == full.grid
            if full.levels is None:
                assert split.levels is None
                continue
            assert len(split.levels) == len(full.levels)
            for index, level in enumerate(full.levels):
                if index < k - 1:
                    assert split.levels[index] is None
                    with pytest.raises(ValueError, match="frozen prefix"):
                        split.level(index)
                else:
                    torch.testing.assert_close(split.levels[index], level, rtol=0, atol=1e-5, msg=f"level {index}, k={k}")


def assert_split_text_matches(tower, ids: torch.Tensor, mask: torch.Tensor) -> None:
    tower.eval()
    with torch.no_grad():
        full = tower.forward_features(ids, mask)
        for k in range(tower.num_layers + 1):
            split = tower.forward_features_from(tower.forward_frozen(ids, mask, k), mask, k)
            torch.testing.assert_close(split, full, rtol=0, atol=1e-5, msg=f"k={k}")


@pytest.mark.parametrize("kind", ["vit", "convnet"])
def test_builtin_vision_split_forward_is_the_forward(kind):
    torch.manual_seed(0)
    config = VisionConfig(kind=kind, image_size=32, patch_size=8, width=32, depth=3, heads=2, local_blocks=1)
    tower = build_vision_tower(config, pretrained=False)
    assert tower.num_layers == 4  # stem + 3 blocks
    assert_split_vision_matches(tower, torch.randn(2, 3, 32, 32))


def test_builtin_text_split_forward_is_the_forward():
    torch.manual_seed(0)
    tower = build_text_tower(TextConfig(vocab_size=512, context_length=16, width=32, depth=2, heads=2), pretrained=False)
    ids, mask = tower.tokenizer(["a red striped dress", "shoes"])
    assert not mask.all()  # padding, which the blocks must mask in both paths
    assert_split_text_matches(tower, ids, mask)


def test_frozen_prefix_is_what_freezing_freezes():
    """Exactly the parameters of the first `frozen_prefix` layers lose their gradient, for
    every tower and every number of unfrozen blocks."""
    model = ECLIP(override(micro_config(), ["vision.depth=3", "text.depth=2"]))
    for keep in range(5):
        optim = OptimConfig(freeze_vision=True, freeze_text=True, unfreeze_last_vision_blocks=keep, unfreeze_last_text_blocks=keep)
        apply_freezing(model, optim)
        prefix = frozen_prefix(model, optim)
        assert prefix == {"vision": max(4 - keep, 0), "text": max(3 - keep, 0)}
        for kind in ("vision", "text"):
            tower = getattr(model, kind)
            layers, _ = tower.param_layers()
            frozen = {name for name, p in tower.named_parameters() if not p.requires_grad}
            assert frozen == {name for name in layers if layers[name] < prefix[kind]}, (kind, keep)
    assert frozen_prefix(model, OptimConfig()) == {"vision": 0, "text": 0}
    assert frozen_prefix_length(model.vision, frozen=True) == model.vision.num_layers  # all of it


def test_split_forward_refuses_a_prefix_longer_than_the_tower():
    tower = build_vision_tower(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2), pretrained=False)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        tower.forward_frozen(torch.randn(1, 3, 32, 32), 3)
