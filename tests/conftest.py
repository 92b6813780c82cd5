import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from eclip.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from eclip.data import ShopSynthConfig, generate  # noqa: E402


def micro_config(decoder: bool = True) -> ModelConfig:
    """A model small enough for unit tests: 32 px, 4x4 tokens, one layer per tower."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextConfig(vocab_size=512, context_length=16, width=32, depth=1, heads=2),
        decoder=DecoderConfig(num_queries=4, depth=2, width=32, heads=2) if decoder else None,
        embed_dim=16,
    )


@pytest.fixture(scope="session")
def synth_catalog(tmp_path_factory):
    """A small ShopSynth catalog shared by the data and training tests."""
    out = tmp_path_factory.mktemp("shopsynth")
    return generate(out, ShopSynthConfig(num_products=60, images_per_product=3, image_size=64, seed=3), progress=False)
