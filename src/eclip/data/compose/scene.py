"""One composed scene: a product's cut-out among distractors on a backdrop, with its boxes, and
the settings that draw it (`ComposeConfig`, named regimes)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..shopsynth import OVERLAY_TEXT, PROMO
from .backgrounds import BACKGROUNDS, CLASSIC_BACKGROUNDS, PhotoSource, background, camera

BANNER_WORDS = OVERLAY_TEXT + [p.upper() for p in PROMO]


@dataclass
class ComposeConfig:
    scenes_per_product: int = 3
    size: int = 224
    seed: int = 0
    regime: str = "large"  # a name of REGIMES, or "mixed": one of them drawn per scene
    product_scale: tuple[float, float] = (0.4, 0.75)  # product's longer side / scene side
    # product's box area / scene area; when set it replaces product_scale (longer side capped
    # at max(product_scale) of the scene)
    product_area: tuple[float, float] | None = None
    distractor_scale: tuple[float, float] = (0.2, 0.45)  # a distractor's longer side / scene side
    distractors: tuple[int, int] = (1, 5)
    occluder_probability: float = 0.4  # one distractor goes in front of the product
    max_occlusion: float = 0.3  # at most this fraction of the product's pixels hidden
    banner_probability: float = 0.6
    banners: tuple[int, int] = (1, 2)  # promo words per scene that has any
    clutter: tuple[int, int] = (0, 4)  # lines and confetti
    backgrounds: tuple[str, ...] = CLASSIC_BACKGROUNDS  # kinds drawn uniformly (BACKGROUNDS)
    camera_probability: float = 0.0  # sensor noise, blur and JPEG artefacts on the whole scene
    people_probability: float = 0.0  # one more distractor: a catalog photo that shows a person
    keep_clean: bool = False  # also list the clean photo (box: its cut-out's box) per product
    quality: int = 90  # JPEG

    def validate(self) -> None:
        """ValueError naming the field, for settings that cannot draw a scene."""
        def pair(name, low_bound, high_bound):
            value = getattr(self, name)
            if value is None:
                return
            if len(value) != 2 or not (low_bound <= value[0] <= value[1] <= high_bound):
                raise ValueError(f"{name} {tuple(value)} is not (low, high) with {low_bound} <= low <= high <= {high_bound}")

        if self.regime not in REGIMES and self.regime != "mixed":
            raise ValueError(f"regime {self.regime!r} is not one of {', '.join([*REGIMES, 'mixed'])}")
        if self.scenes_per_product < 1 or self.size < 16:
            raise ValueError(f"scenes_per_product ({self.scenes_per_product}) must be >= 1 and size ({self.size}) >= 16")
        pair("product_scale", 0.01, 1.0)
        pair("product_area", 1e-4, 1.0)
        pair("distractor_scale", 0.01, 1.0)
        pair("distractors", 0, 64)
        pair("banners", 0, 16)
        pair("clutter", 0, 256)
        for name in ["occluder_probability", "max_occlusion", "banner_probability", "camera_probability", "people_probability"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} ({getattr(self, name)}) must lie in [0, 1]")
        if not self.backgrounds:
            raise ValueError("backgrounds is empty: give at least one kind")
        unknown = [k for k in self.backgrounds if k not in BACKGROUNDS]
        if unknown:
            raise ValueError(f"unknown background kinds {unknown}; known: {', '.join(BACKGROUNDS)}")


# The geometry of each regime; the look (backgrounds, camera, people, banners) is set apart.
# large is the composer's original setting; small is the hard case: a product of at most 15 %
# of the scene among 2 to 4 distractors as large as it or larger.
REGIMES: dict[str, dict] = {
    "large": {"product_scale": (0.4, 0.75), "product_area": None, "distractors": (1, 5), "distractor_scale": (0.2, 0.45)},
    "medium": {"product_area": (0.12, 0.3), "distractors": (1, 4), "distractor_scale": (0.2, 0.45)},
    "small": {"product_area": (0.02, 0.15), "distractors": (2, 4), "distractor_scale": (0.25, 0.5)},
}
GEOMETRY = ("product_scale", "product_area", "distractors", "distractor_scale")


def regime_config(regime: str, **overrides) -> ComposeConfig:
    """A config with `regime`'s geometry, then `overrides` (any ComposeConfig field)."""
    known = {f.name for f in fields(ComposeConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown ComposeConfig fields {bad}")
    preset = REGIMES.get(regime, {})
    config = replace(ComposeConfig(), regime=regime, **preset)
    config = replace(config, **overrides)
    config.validate()
    return config


def scene_config(config: ComposeConfig, rng: random.Random) -> ComposeConfig:
    """The config a scene is drawn with: config itself, or under "mixed" a regime drawn from the
    scene's own stream with that regime's geometry."""
    if config.regime != "mixed":
        return config
    regime = rng.choice(sorted(REGIMES))
    return replace(config, regime=regime, **REGIMES[regime])


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# ---------------------------------------------------------------------------- one scene


def _scaled(cut: Image.Image, longer: int, flip: bool) -> Image.Image:
    w, h = cut.size
    scale = longer / max(w, h)
    out = cut.resize((max(2, round(w * scale)), max(2, round(h * scale))), Image.BILINEAR)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def _box(mask: np.ndarray) -> list[int] | None:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]  # x1, y1 exclusive


def product_side(cut: Image.Image, rng: random.Random, config: ComposeConfig) -> int:
    """The pasted product's longer side in pixels: drawn as a share of the scene side, or from
    an area share of the scene (its box: w * h = share * size^2)."""
    size = config.size
    if config.product_area is None:
        return round(rng.uniform(*config.product_scale) * size)
    share = rng.uniform(*config.product_area)
    w, h = cut.size
    longer = max(w, h) * math.sqrt(share * size * size / (w * h))
    # a long thin product at a large share would outgrow the cut-out's resolution or the scene
    return max(2, min(math.floor(longer), math.ceil(max(config.product_scale) * size), size))


def render_scene(
    product: Image.Image,
    distractors: list[Image.Image],
    rng: random.Random,
    config: ComposeConfig,
    photos: PhotoSource | None = None,
) -> tuple[Image.Image, dict]:
    """One scene: product and distractor cut-outs (RGBA) on a backdrop (`photos` draws catalog
    photos for the photo backdrops). Returns the scene and {"box": visible box, "full_box",
    "occlusion", "area": the visible box's share of the scene} in pixels (x1, y1 exclusive)."""
    size = config.size
    nrng = np.random.default_rng(rng.getrandbits(64))
    scene = Image.fromarray(background(nrng, size, tuple(config.backgrounds), photos))
    draw = ImageDraw.Draw(scene)
    for _ in range(rng.randint(*config.clutter)):  # clutter: lines and confetti, as ShopSynth draws them
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.line([(rng.randint(0, size), rng.randint(0, size)) for _ in range(2)], fill=colour, width=rng.randint(1, 3))
        else:
            x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(2, 6)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    item = _scaled(product, product_side(product, rng, config), flip=False)
    pw, ph = item.size
    px, py = rng.randint(0, size - pw), rng.randint(0, size - ph)
    product_mask = np.zeros((size, size), bool)
    product_mask[py : py + ph, px : px + pw] = np.asarray(item.getchannel("A")) > 127
    if not product_mask.any():  # a hairline cut-out that vanished when scaled: its rectangle
        product_mask[py : py + ph, px : px + pw] = True
    product_area = max(1, int(product_mask.sum()))

    occluder = None
    if distractors and rng.random() < config.occluder_probability:
        occluder = distractors[-1]
        distractors = distractors[:-1]

    # distractors behind the product: of a few random spots, the one the product hides least,
    # so that they stay visible as competing instances
    for cut in distractors:
        d = _scaled(cut, round(rng.uniform(*config.distractor_scale) * size), flip=rng.random() < 0.5)
        dw, dh = d.size
        best = None
        for _ in range(4):
            x, y = rng.randint(0, size - dw), rng.randint(0, size - dh)
            hidden = product_mask[y : y + dh, x : x + dw].mean()
            if best is None or hidden < best[0]:
                best = (hidden, x, y)
            if hidden < 0.2:
                break
        scene.paste(d, (best[1], best[2]), d)
    scene.paste(item, (px, py), item)

    covered = np.zeros((size, size), bool)
    if occluder is not None:
        # in front: it should touch the product (otherwise it is just one more distractor) yet
        # hide at most max_occlusion of it
        d = _scaled(occluder, round(rng.uniform(*config.distractor_scale) * size), flip=rng.random() < 0.5)
        dw, dh = d.size
        alpha = np.asarray(d.getchannel("A")) > 127
        best = None
        for _ in range(12):
            x, y = rng.randint(0, size - dw), rng.randint(0, size - dh)
            hidden = (product_mask[y : y + dh, x : x + dw] & alpha).sum() / product_area
            if hidden <= config.max_occlusion and (best is None or hidden > best[0]):
                best = (hidden, x, y)
                if hidden >= 0.05:
                    break
        if best is not None:
            scene.paste(d, (best[1], best[2]), d)
            covered[best[2] : best[2] + dh, best[1] : best[1] + dw] |= alpha

    if rng.random() < config.banner_probability:
        for _ in range(rng.randint(*config.banners)):
            _banner(scene, draw, rng, product_mask, covered, product_area, config)

    if config.camera_probability > 0 and rng.random() < config.camera_probability:
        scene = camera(scene, nrng)

    visible = product_mask & ~covered
    box = _box(visible)
    full_box = _box(product_mask)
    area = 0.0 if box is None else (box[2] - box[0]) * (box[3] - box[1]) / (size * size)
    return scene, {"box": box, "full_box": full_box, "occlusion": round(1 - visible.sum() / product_area, 4), "area": round(area, 4)}


def _banner(scene, draw, rng, product_mask, covered, product_area, config) -> None:
    """A promo word, on a coloured band or as outlined text, where it leaves the product at most
    max_occlusion hidden (tried a few times, else left out)."""
    size = config.size
    text = rng.choice(BANNER_WORDS)
    font = _font(rng.randint(max(8, size // 18), max(10, size // 8)))
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    tw, th = x1 - x0 + 8, y1 - y0 + 6
    if tw >= size or th >= size:
        return
    band = rng.random() < 0.6
    for _ in range(6):
        x, y = rng.randint(0, size - tw), rng.randint(0, size - th)
        area = np.zeros_like(covered)
        area[y : y + th, x : x + tw] = True
        if ((covered | area) & product_mask).sum() / product_area <= config.max_occlusion:
            break
    else:
        return
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    if band:
        draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=colour)
        draw.text((x + 4 - x0, y + 3 - y0), text, font=font, fill=(255, 255, 255))
        covered[y : y + th, x : x + tw] = True
    else:
        draw.text((x + 4 - x0, y + 3 - y0), text, font=font, fill=colour, stroke_width=1, stroke_fill=(0, 0, 0))
        # bare letters hide only their own pixels: the product shows between them, and the
        # visible box must count it (the placement check above used the whole rectangle)
        ink = Image.new("L", (tw, th), 0)
        ImageDraw.Draw(ink).text((4 - x0, 3 - y0), text, font=font, fill=255, stroke_width=1, stroke_fill=255)
        covered[y : y + th, x : x + tw] |= np.asarray(ink) > 0


