"""One way to build a tower: `{kind: class}` registries and the two build functions that
`ECLIP` uses. Every class is called as `cls(config, pretrained=...)`; `pretrained` says whether
it loads (and possibly fetches) its pretrained weights, off when every weight comes from a saved
model. Adapter modules import their library only when a tower is built."""

from __future__ import annotations

from ...config import TextConfig, VisionConfig
from .base import TextTower, VisionTower
from .builtin import TinyConvNet, TinyTextTransformer, TinyViT
from .hf import HFText
from .open_clip import OpenCLIPText, OpenCLIPVision
from .timm import EfficientNetLite0, TimmVision

VISION_TOWERS: dict[str, type[VisionTower]] = {
    "vit": TinyViT,
    "convnet": TinyConvNet,
    "open_clip": OpenCLIPVision,
    "timm": TimmVision,
    "efficientnet_lite0": EfficientNetLite0,
}
TEXT_TOWERS: dict[str, type[TextTower]] = {
    "transformer": TinyTextTransformer,
    "open_clip": OpenCLIPText,
    "hf": HFText,
}


def register_vision_tower(kind: str, cls: type[VisionTower]) -> None:
    """Make `vision.kind=kind` build `cls(config, pretrained=...)`."""
    VISION_TOWERS[kind] = cls


def register_text_tower(kind: str, cls: type[TextTower]) -> None:
    """Make `text.kind=kind` build `cls(config, pretrained=...)`."""
    TEXT_TOWERS[kind] = cls


def build_vision_tower(config: VisionConfig, pretrained: bool) -> VisionTower:
    if config.kind not in VISION_TOWERS:
        raise ValueError(f"unknown vision tower kind {config.kind!r} (one of {tuple(VISION_TOWERS)})")
    return VISION_TOWERS[config.kind](config, pretrained=pretrained)


def build_text_tower(config: TextConfig, pretrained: bool) -> TextTower:
    if config.kind not in TEXT_TOWERS:
        raise ValueError(f"unknown text tower kind {config.kind!r} (one of {tuple(TEXT_TOWERS)})")
    return TEXT_TOWERS[config.kind](config, pretrained=pretrained)
