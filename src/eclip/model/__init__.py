from .eclip import ECLIP, Grounding, ImageEncoding, select_instances
from .tokenizer import HashTokenizer
from .towers import TextTower, VisionFeatures, VisionTower, build_text_tower, build_vision_tower

__all__ = [
    "ECLIP",
    "Grounding",
    "HashTokenizer",
    "ImageEncoding",
    "TextTower",
    "VisionFeatures",
    "VisionTower",
    "build_text_tower",
    "build_vision_tower",
    "select_instances",
]
