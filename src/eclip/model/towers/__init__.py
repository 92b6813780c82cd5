"""Vision and text towers behind one interface (`base`), built by kind (`factory`): the built-in
towers (`builtin`) and one adapter module per library (`open_clip`, `timm`, `hf`)."""

from .base import (
    TextTower,
    Tokenizer,
    VisionFeatures,
    VisionTower,
    frozen_prefix_length,
)
from .factory import (
    TEXT_TOWERS,
    VISION_TOWERS,
    build_text_tower,
    build_vision_tower,
    register_text_tower,
    register_vision_tower,
)

__all__ = [
    "TEXT_TOWERS",
    "VISION_TOWERS",
    "TextTower",
    "Tokenizer",
    "VisionFeatures",
    "VisionTower",
    "build_text_tower",
    "build_vision_tower",
    "frozen_prefix_length",
    "register_text_tower",
    "register_vision_tower",
]
