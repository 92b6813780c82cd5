"""Scene composer: clean catalog photos -> cluttered multi-product scenes with true boxes.

Real catalogs such as the Myntra sample hold one clean studio shot per product on a white
background. ECLIP needs the opposite: several images per product (the intra-product objective)
in which the product is one instance among others (the instance-level evaluation). The composer
cuts each product out of its white background, pastes it at a random scale and position on a
backdrop among distractor products of other categories (also cut out), sometimes lets one
distractor or a promo banner cover part of it (never more than `max_occlusion` of its pixels),
and records its box.

The recorded `box` is the box of the product's *visible* pixels (what grounding can find); the
box of the whole pasted product, occluded parts included, is kept as `full_box`, the hidden
fraction of its pixels as `occlusion`, the visible box's share of the scene as `area`, the
scene's regime as `regime` and the distractors' product ids as `distractors`; `load_catalog`
reads `box` and ignores the others. Every scene is drawn from its own random stream (seed,
product id, scene index), so the output is the same whatever the order or subset of products,
the number of worker processes or of ranks.
"""

from .backgrounds import (
    BACKGROUNDS,
    CLASSIC_BACKGROUNDS,
    PHOTO_BACKGROUNDS,
    TEXTURE_BACKGROUNDS,
    background,
    camera,
)
from .cutout import CutOutCache, cut_out, cut_out_mask, skin_fraction
from .run import ComposeResult, available_cores, compose_catalog, merge_parts, share
from .scene import GEOMETRY, REGIMES, ComposeConfig, regime_config, render_scene, scene_config

__all__ = [
    "BACKGROUNDS", "CLASSIC_BACKGROUNDS", "GEOMETRY", "PHOTO_BACKGROUNDS", "REGIMES", "TEXTURE_BACKGROUNDS",
    "ComposeConfig", "ComposeResult", "CutOutCache", "available_cores", "background", "camera",
    "compose_catalog", "cut_out", "cut_out_mask", "merge_parts", "regime_config", "render_scene",
    "scene_config", "share", "skin_fraction",
]
