"""Scene composer: clean catalog photos -> cluttered multi-product scenes with true boxes.

Real catalogs such as the Myntra sample hold one clean studio shot per product on a white
background. ECLIP needs the opposite: several images per product (the intra-product objective)
in which the product is one instance among others (the instance-level evaluation). The composer
cuts each product out of its white background, pastes it at a random scale and position on a
procedural background among 1 to 5 distractor products of other categories (also cut out),
sometimes lets one distractor or a promo banner cover part of it (never more than
`max_occlusion` of its pixels), and records its box.

The recorded `box` is the box of the product's *visible* pixels (what grounding can find); the
box of the whole pasted product, occluded parts included, is kept as `full_box`, the hidden
fraction of its pixels as `occlusion` and the distractors' product ids as `distractors`;
`load_catalog` reads `box` and ignores the others.
Every scene is drawn from its own random stream (seed, product id, scene index), so the output
is the same whatever the order or subset of products.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .catalog import Product
from .shopsynth import OVERLAY_TEXT, PROMO

logger = logging.getLogger("eclip.data")

BANNER_WORDS = OVERLAY_TEXT + [p.upper() for p in PROMO]


@dataclass
class ComposeConfig:
    scenes_per_product: int = 3
    size: int = 224
    seed: int = 0
    product_scale: tuple[float, float] = (0.4, 0.75)  # product's longer side / scene side
    distractor_scale: tuple[float, float] = (0.2, 0.45)
    distractors: tuple[int, int] = (1, 5)
    occluder_probability: float = 0.4  # one distractor goes in front of the product
    max_occlusion: float = 0.3  # at most this fraction of the product's pixels hidden
    banner_probability: float = 0.6
    keep_clean: bool = False  # also list the clean photo (box: its cut-out's box) per product
    quality: int = 90  # JPEG


@dataclass
class ComposeResult:
    catalog: Path
    products: int
    scenes: int
    seconds: float
    fallback_distractors: int  # products with no other category: distractors of any other product
    empty_masks: int  # photos whose cut-out failed (pasted whole, as an opaque rectangle)
    unreadable: int = 0  # products skipped: their photo does not decode

    @property
    def scenes_per_second(self) -> float:
        return self.scenes / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------------- cut-out


def cut_out_mask(rgb: np.ndarray, tolerance: int = 10, keep_fraction: float = 0.15, edge_threshold: float = 12.0) -> np.ndarray:
    """Foreground mask (H, W) bool of a product photographed on a plain light background.

    The background colour is the median of the photo's border (studio shots are white or light
    grey); a pixel further than `tolerance` from it in any channel is foreground. The tolerance
    is low because white clothes on white differ from it by only a few levels. An opening removes
    JPEG speckle, the largest component is kept together with components at least
    `keep_fraction` of its size (the second shoe of a pair), a closing seals small gaps in the
    outline, and every hole is filled: the white body of a white t-shirt enclosed by its trims
    and the white gap inside a bag's handle look the same to a threshold, and a bag with a white
    gap is a smaller error than a t-shirt without its body.
    """
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.int16)
    paper = np.median(border, axis=0)  # the studio backdrop colour
    distance = np.abs(rgb.astype(np.int16) - paper).max(axis=2)
    foreground = ndimage.binary_opening(distance > tolerance, structure=np.ones((3, 3), bool))
    # faint outlines (a white shirt on white is a few levels of shading at its edge) join the
    # foreground, so that the closing and hole filling below can recover the white inside
    grey = rgb.astype(np.float32).mean(axis=2)
    edges = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1)) > edge_threshold
    foreground |= edges
    labels, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = ndimage.sum(foreground, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
    mask = np.isin(labels, keep)
    # closing without the border effect: pad so the structure never reads outside the image
    pad = 3
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=np.ones((5, 5), bool))[pad:-pad, pad:-pad]
    filled = ndimage.binary_fill_holes(closed | mask)
    # the edges and the closing grew the outline by a pixel or two of background: shave the
    # rim's background-coloured pixels off again, or every pasted product wears a white halo
    rim = filled & ~ndimage.binary_erosion(filled, iterations=3, border_value=1)
    filled &= ~(rim & (distance <= tolerance))
    return filled


def cut_out(image: Image.Image, max_side: int | None = None) -> tuple[Image.Image, bool]:
    """RGBA crop of the product (alpha = mask) and whether the mask was usable. A photo whose
    mask is (nearly) empty is returned whole and opaque: the product is then at least present."""
    image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BILINEAR)  # nothing is pasted larger than this
    rgb = np.asarray(image)
    mask = cut_out_mask(rgb)
    ok = mask.sum() >= 0.01 * mask.size
    if not ok:
        mask = np.ones(mask.shape, bool)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgba = np.dstack([rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255])
    return Image.fromarray(rgba, "RGBA"), bool(ok)


class CutOutCache:
    """Cut-outs by image path, least recently used dropped first (a product is a distractor in
    many scenes; a 7,000-product catalog does not fit in memory as cut-outs)."""

    def __init__(self, max_side: int, capacity: int = 2048):
        self.max_side = max_side
        self.capacity = capacity
        self.items: OrderedDict[str, Image.Image] = OrderedDict()
        self.empty: set[str] = set()

    def get(self, path: str) -> Image.Image:
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        with Image.open(path) as image:
            cut, ok = cut_out(image, self.max_side)
        if not ok and path not in self.empty:
            self.empty.add(path)
            logger.warning("no product found on the background of %s; it is pasted whole", path)
        self.items[path] = cut
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return cut


# ---------------------------------------------------------------------------- backgrounds


def _colour(rng: np.random.Generator, low: int = 40, high: int = 235) -> np.ndarray:
    return rng.integers(low, high, size=3).astype(np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural backdrop (size, size, 3) uint8: solid, gradient, blotchy noise, stripes or
    tiles, plus fine sensor-like noise. Never plain white, so the scene is not the catalog photo."""
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = _colour(rng), _colour(rng)
    if kind == 0:
        out = np.broadcast_to(a, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        out = a + (b - a) * t[..., None]
    elif kind == 2:  # blotchy: coarse colour noise, upsampled smoothly
        cells = int(rng.integers(3, 9))
        coarse = np.clip(a + rng.normal(0, 35, (cells, cells, 3)), 0, 255).astype(np.uint8)
        out = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    elif kind == 3:  # stripes, horizontal, vertical or diagonal
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        period = rng.uniform(0.04, 0.2)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        out = np.where((np.floor(t) % 2 == 0)[..., None], a, b)
    else:  # tiles: per-tile shade around one colour, darker grout lines
        tile = int(rng.integers(max(3, size // 10), max(4, size // 3)))
        n = size // tile + 1
        shades = a + rng.normal(0, 15, (n, n, 1))
        iy, ix = (np.arange(size) // tile), (np.arange(size) // tile)
        out = shades[iy[:, None], ix[None, :]]
        grout = (np.arange(size) % tile < 2)
        out[grout, :] *= 0.6
        out[:, grout] *= 0.6
    out = out + rng.normal(0, 4, (size, size, 1))
    return np.clip(out, 0, 255).astype(np.uint8)


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


def render_scene(
    product: Image.Image,
    distractors: list[Image.Image],
    rng: random.Random,
    config: ComposeConfig,
) -> tuple[Image.Image, dict]:
    """One scene: product and distractor cut-outs (RGBA) on a backdrop. Returns the scene and
    {"box": visible box, "full_box", "occlusion"} in pixels (x1, y1 exclusive)."""
    size = config.size
    nrng = np.random.default_rng(rng.getrandbits(64))
    scene = Image.fromarray(background(nrng, size))
    draw = ImageDraw.Draw(scene)
    for _ in range(rng.randint(0, 4)):  # clutter: lines and confetti, as ShopSynth draws them
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.line([(rng.randint(0, size), rng.randint(0, size)) for _ in range(2)], fill=colour, width=rng.randint(1, 3))
        else:
            x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(2, 6)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    item = _scaled(product, round(rng.uniform(*config.product_scale) * size), flip=False)
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
        for _ in range(rng.randint(1, 2)):
            _banner(scene, draw, rng, product_mask, covered, product_area, config)

    visible = product_mask & ~covered
    box = _box(visible)
    full_box = _box(product_mask)
    return scene, {"box": box, "full_box": full_box, "occlusion": round(1 - visible.sum() / product_area, 4)}


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


# ---------------------------------------------------------------------------- a catalog


def _safe_name(product_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", product_id)[:80]


def compose_catalog(
    products: list[Product],
    out_dir: str | Path,
    config: ComposeConfig | None = None,
    progress: bool = True,
) -> ComposeResult:
    """Write `images/` and `catalog.jsonl` (each product with its K scenes, boxes in pixels)
    under out_dir. Each product's first image is its clean photo."""
    from tqdm import tqdm

    config = config or ComposeConfig()
    if config.distractors[0] < 0 or config.distractors[0] > config.distractors[1]:
        raise ValueError(f"distractors range {config.distractors} is not (low, high) with 0 <= low <= high")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # nothing is pasted larger than max(product_scale) of the scene: cut out at that size
    cache = CutOutCache(max_side=math.ceil(max(config.product_scale) * config.size))

    # distractors are drawn uniformly over the products of the other (known) categories: a
    # second t-shirt in a t-shirt's scene would make the title ambiguous
    others: dict[str | None, list[int]] = {}
    for category in {p.category for p in products if p.category is not None}:
        others[category] = [i for i, p in enumerate(products) if p.category is not None and p.category != category]
    fallback = 0
    unreadable: set[int] = set()
    records = []
    started = time.perf_counter()
    scenes = 0
    for index, product in enumerate(tqdm(products, desc="composing", unit="product", disable=not progress, leave=False)):
        # a product without a category, or a catalog of one category, falls back to any other product
        pool = others.get(product.category) or []
        if not pool:
            fallback += 1
        try:
            cut = cache.get(product.images[0].path)
        except Exception as error:  # PIL raises many types for broken files; one must not end the run
            logger.warning("product %s: photo %s unreadable (%s); skipped", product.product_id, product.images[0].path, error)
            unreadable.add(index)
            continue
        images = []
        for k in range(config.scenes_per_product):
            rng = random.Random(f"{config.seed}-{product.product_id}-{k}")
            picks, pick_ids = [], []
            for _ in range(rng.randint(*config.distractors)):
                if pool:
                    other = rng.choice(pool)
                else:
                    other = rng.randrange(len(products) - 1) if len(products) > 1 else None
                    if other is not None and other >= index:
                        other += 1  # skip the product itself
                if other is not None and other not in unreadable:
                    try:
                        picks.append(cache.get(products[other].images[0].path))
                    except Exception:
                        unreadable.add(other)  # reported when its own turn comes
                        continue
                    pick_ids.append(products[other].product_id)
            scene, boxes = render_scene(cut, picks, rng, config)
            name = f"images/{index:06d}_{_safe_name(product.product_id)}_{k}.jpg"
            scene.save(out / name, quality=config.quality)
            # the distractors' ids: which products compete with this one (load_catalog ignores them)
            images.append({"path": name, **boxes, "distractors": pick_ids})
            scenes += 1
        if config.keep_clean:
            images.append(_clean_entry(product.images[0].path))
        record = {"product_id": product.product_id, "title": product.title, "images": images}
        if product.category is not None:
            record["category"] = product.category
        if product.attributes:
            record["attributes"] = product.attributes
        records.append(json.dumps(record, ensure_ascii=False) + "\n")
    seconds = time.perf_counter() - started
    if fallback:
        logger.warning("%d products have no product of another category; their distractors are any other product", fallback)

    catalog = out / "catalog.jsonl"
    tmp = catalog.with_name(catalog.name + ".tmp")
    tmp.write_text("".join(records), encoding="utf-8")
    tmp.replace(catalog)
    (out / "compose.json").write_text(json.dumps(asdict(config), indent=2))
    return ComposeResult(catalog, len(products) - len(unreadable), scenes, seconds, fallback, len(cache.empty), len(unreadable))


def _clean_entry(path: str) -> dict:
    """The clean photo, by absolute path, with the box of its cut-out in its own pixels."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    mask = cut_out_mask(rgb)
    box = _box(mask) if mask.sum() >= 0.01 * mask.size else None
    return {"path": str(Path(path).resolve()), "box": box or [0, 0, rgb.shape[1], rgb.shape[0]]}
