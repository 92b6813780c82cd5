"""eclip: instance-level multi-modal pretraining for e-commerce (ECLIP, CVPR 2023).

    import eclip
    model = eclip.load_model("runs/demo/eclip/model")  # or "hf-hub:org/name", eclip.create_model("tiny")
    vecs = model.encode_images(["a.jpg", "b.jpg"])     # (2, D) numpy: one product vector per photo
    txt = model.encode_texts(["red striped tee"])      # (1, D) numpy
    g = model.ground("a.jpg", "red striped tee")       # g.box_pixels, g.heatmap
"""

from .config import (
    DecoderConfig,
    LossConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from .devices import resolve_device
from .io import load_model, save_model
from .losses import ECLIPLoss
from .model import ECLIP, Grounding, HashTokenizer, ImageEncoding
from .model.inference import GroundResult
from .presets import model_preset, objective_preset
from .version import __version__


def create_model(
    preset: str = "tiny",
    objective: str = "eclip",
    overrides: list[str] | None = None,
    pretrained: bool = True,
    device: str | None = "cpu",
) -> ECLIP:
    """A freshly initialised model from a named preset, with `"a.b=value"` overrides, on
    `device` (None: CUDA when present, else the CPU); its towers load their pretrained weights
    unless `pretrained=False` (the architecture only)."""
    from .config import override

    config = model_preset(preset, objective)
    if overrides:
        config = override(config, overrides)
    return ECLIP(config, pretrained=pretrained).to(resolve_device(device))


__all__ = [
    "ECLIP",
    "DecoderConfig",
    "ECLIPLoss",
    "GroundResult",
    "Grounding",
    "HashTokenizer",
    "ImageEncoding",
    "LossConfig",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "__version__",
    "create_model",
    "load_model",
    "model_preset",
    "objective_preset",
    "save_model",
]
