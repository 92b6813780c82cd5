from .eclip import ECLIP
from .inference import Grounding, ImageEncoding, Inference, select_instances
from .tokenizer import HashTokenizer
from .towers import TextTower, VisionFeatures, VisionTower, build_text_tower, build_vision_tower

__all__ = [
    "ECLIP",
    "Grounding",
    "HashTokenizer",
    "ImageEncoding",
    "Inference",
    "TextTower",
    "VisionFeatures",
    "VisionTower",
    "build_text_tower",
    "build_vision_tower",
    "select_instances",
]
