"""eclip: instance-level multi-modal pretraining for e-commerce (ECLIP, CVPR 2023).

    import eclip
    model = eclip.create_model("tiny")                # or eclip.load_model("runs/x/model")
    enc = model.encode_image(images)                  # global, instances, productness, attention
    txt = model.encode_text(["red striped tee"])
    vec = model.product_embedding(images)             # one vector per image, no text needed
    g = model.ground(images, ["red striped tee"] * len(images))   # heat maps and boxes
"""

from .config import (
    DecoderConfig,
    LossConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from .io import load_model, save_model
from .losses import ECLIPLoss
from .model import ECLIP, Grounding, HashTokenizer, ImageEncoding
from .presets import model_preset, objective_preset

__version__ = "0.1.0"


def create_model(
    preset: str = "tiny", objective: str = "eclip", overrides: list[str] | None = None, pretrained: bool = True
) -> ECLIP:
    """A freshly initialised model from a named preset, with `"a.b=value"` overrides; its towers
    load their pretrained weights unless `pretrained=False` (the architecture only)."""
    from .config import override

    config = model_preset(preset, objective)
    if overrides:
        config = override(config, overrides)
    return ECLIP(config, pretrained=pretrained)


__all__ = [
    "ECLIP",
    "DecoderConfig",
    "ECLIPLoss",
    "Grounding",
    "HashTokenizer",
    "ImageEncoding",
    "LossConfig",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "load_model",
    "model_preset",
    "objective_preset",
    "save_model",
]
