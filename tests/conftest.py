import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from eclip.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from eclip.data import ShopSynthConfig, generate, load_catalog  # noqa: E402
from eclip.data.compose import ComposeConfig, compose_catalog  # noqa: E402


def micro_config(decoder: bool = True, intra_head: bool = False) -> ModelConfig:
    """A model small enough for unit tests: 32 px, 4x4 tokens, one layer per tower
    (`intra_head`: the decoder's intra objective through a head of its own)."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextConfig(vocab_size=512, context_length=16, width=32, depth=1, heads=2),
        decoder=DecoderConfig(num_queries=4, depth=2, width=32, heads=2, intra_head=intra_head) if decoder else None,
        embed_dim=16,
    )


@pytest.fixture(scope="session")
def synth_catalog(tmp_path_factory):
    """A small ShopSynth catalog shared by the data and training tests."""
    out = tmp_path_factory.mktemp("shopsynth")
    return generate(out, ShopSynthConfig(num_products=60, images_per_product=3, image_size=64, seed=3), progress=False)


# --------------------------------------------------------------- clean photos and composed scenes
# (the composer's and the scene evaluation's tests)

# one pure colour per product, grouped by category; the scene backgrounds never reach 0 or 255
# in a channel, so an exact match of these colours is the product itself
COLOURS = {
    "tee": [(255, 0, 0), (255, 0, 255)],
    "shoe": [(0, 255, 0), (0, 255, 255)],
    "bag": [(0, 0, 255), (255, 255, 0)],
}


def studio_photo(colour, shape: str, size: int = 96) -> Image.Image:
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
            studio_photo(colour, "ellipse" if k == 0 else "rect").save(root / "images" / f"{pid}.png")
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
