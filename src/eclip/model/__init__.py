from .eclip import ECLIP, Grounding, ImageEncoding, select_instances
from .tokenizer import HashTokenizer
from .towers import TextTower, VisionFeatures, VisionTower

__all__ = [
    "ECLIP",
    "Grounding",
    "HashTokenizer",
    "ImageEncoding",
    "TextTower",
    "VisionFeatures",
    "VisionTower",
    "select_instances",
]
