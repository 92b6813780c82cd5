"""ShopSynth: a procedural e-commerce catalog, deterministic by seed.

Each product is a drawn shape (its category) with a colour and a pattern. Each listing image
places the product at a random scale and position among distractor products of other
categories, clutter and text overlays on a random background, and records the product's true
box. Titles are noisy: brand, promo words, synonyms, dropped words. It is the embedded default
for the demo and the tests: the product is a small instance in a busy image, which is exactly
where image-level (CLIP) representations fall short.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# Shapes in a unit box: ("poly", points) | ("ellipse", box) | ("rect", box) | ("ring", box, width)
SHAPES: dict[str, list[tuple]] = {
    "t-shirt": [("poly", [(0.3, 0.0), (0.7, 0.0), (1.0, 0.2), (0.88, 0.42), (0.78, 0.36), (0.78, 1.0), (0.22, 1.0), (0.22, 0.36), (0.12, 0.42), (0.0, 0.2)])],
    "dress": [("poly", [(0.35, 0.0), (0.65, 0.0), (0.7, 0.35), (1.0, 1.0), (0.0, 1.0), (0.3, 0.35)])],
    "handbag": [("rect", (0.05, 0.38, 0.95, 1.0)), ("ring", (0.25, 0.0, 0.75, 0.7), 0.09)],
    "sneaker": [("poly", [(0.0, 0.55), (0.1, 0.25), (0.45, 0.3), (0.6, 0.0), (0.75, 0.05), (0.8, 0.5), (1.0, 0.65), (1.0, 1.0), (0.0, 1.0)])],
    "watch": [("rect", (0.35, 0.0, 0.65, 1.0)), ("ellipse", (0.1, 0.2, 0.9, 0.8))],
    "cap": [("ellipse", (0.1, 0.1, 0.9, 1.3)), ("rect", (0.5, 0.62, 1.0, 0.8))],
    "bottle": [("rect", (0.38, 0.0, 0.62, 0.3)), ("rect", (0.15, 0.25, 0.85, 1.0))],
    "mug": [("rect", (0.0, 0.1, 0.72, 1.0)), ("ring", (0.5, 0.3, 1.0, 0.8), 0.1)],
    "sunglasses": [("ellipse", (0.0, 0.3, 0.45, 0.8)), ("ellipse", (0.55, 0.3, 1.0, 0.8)), ("rect", (0.4, 0.4, 0.6, 0.48))],
    "lamp": [("poly", [(0.25, 0.0), (0.75, 0.0), (0.95, 0.45), (0.05, 0.45)]), ("rect", (0.45, 0.45, 0.55, 0.9)), ("rect", (0.2, 0.9, 0.8, 1.0))],
}
# The cap's crown is an ellipse cut by the bottom of its box.

SYNONYMS = {
    "t-shirt": ["t-shirt", "tee", "t shirt", "tshirt"],
    "dress": ["dress", "frock", "gown"],
    "handbag": ["handbag", "bag", "purse", "tote bag"],
    "sneaker": ["sneaker", "sneakers", "running shoe", "trainer"],
    "watch": ["watch", "wristwatch", "analog watch"],
    "cap": ["cap", "baseball cap", "hat"],
    "bottle": ["bottle", "water bottle", "flask"],
    "mug": ["mug", "coffee mug", "cup"],
    "sunglasses": ["sunglasses", "shades", "eyewear"],
    "lamp": ["lamp", "table lamp", "desk lamp"],
}

COLOURS = {
    "red": (210, 35, 40), "blue": (35, 75, 205), "green": (40, 160, 60), "yellow": (240, 210, 40),
    "black": (25, 25, 25), "white": (245, 245, 245), "orange": (245, 130, 25), "purple": (125, 50, 170),
    "pink": (245, 130, 180), "brown": (120, 75, 35), "grey": (130, 130, 130), "teal": (20, 150, 150),
}
PATTERNS = {"solid": ["", "plain", "solid"], "striped": ["striped", "stripes"], "dotted": ["dotted", "polka dot"], "checked": ["checked", "check", "plaid"]}
BRANDS = ["zenko", "aurelia", "northpeak", "lumio", "vantra", "kobu", "maison", "tessa", "orbix", "rayne",
          "quilo", "brava", "nimbo", "sol", "kairo", "velt", "peony", "draxo", "ulma", "fennic"]
PROMO = ["free shipping", "hot sale", "new arrival", "best seller", "2024 new", "limited offer",
         "official store", "premium quality", "for men women", "gift idea", "50 off", "top rated"]
OVERLAY_TEXT = ["SALE", "-30%", "NEW", "HOT", "50% OFF", "FREE SHIP", "BEST", "2 FOR 1"]


@dataclass
class ProductSpec:
    product_id: str
    category: str
    colour: str
    pattern: str
    secondary: str
    brand: str
    aspect: float  # width / height of the product's box
    frequency: int  # stripes, dots or checks across the product


@dataclass
class ShopSynthConfig:
    num_products: int = 1000
    images_per_product: int = 3
    image_size: int = 128
    heldout_fraction: float = 0.2
    product_scale: tuple[float, float] = (0.4, 0.65)  # product box side / image side
    distractor_scale: tuple[float, float] = (0.18, 0.34)
    distractors: tuple[int, int] = (1, 3)
    seed: int = 0


def sample_product(rng: random.Random, index: int) -> ProductSpec:
    colour = rng.choice(list(COLOURS))
    secondary = rng.choice([c for c in COLOURS if c != colour])
    return ProductSpec(
        product_id=f"p{index:06d}",
        category=rng.choice(list(SHAPES)),
        colour=colour,
        pattern=rng.choice(list(PATTERNS)),
        secondary=secondary,
        brand=rng.choice(BRANDS),
        aspect=rng.uniform(0.75, 1.3),
        frequency=rng.randint(3, 6),
    )


def make_title(spec: ProductSpec, rng: random.Random) -> str:
    """A noisy listing title. The category, colour and pattern are always there (the product is
    findable); brand, word order, synonyms and promo words vary."""
    category = rng.choice(SYNONYMS[spec.category])
    pattern = rng.choice(PATTERNS[spec.pattern])
    core = [spec.colour, pattern, category] if pattern else [spec.colour, category]
    if spec.pattern != "solid" and rng.random() < 0.5:
        core.append(f"with {spec.secondary}")
    words = [spec.brand.capitalize(), *core]
    if rng.random() < 0.7:
        words.append(rng.choice(PROMO))
    if rng.random() < 0.3:
        words.insert(0, rng.choice(PROMO))
    return " ".join(w for w in words if w)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: list[tuple], w: int, h: int) -> None:
    for part in shape:
        kind = part[0]
        if kind == "poly":
            draw.polygon([(x * (w - 1), y * (h - 1)) for x, y in part[1]], fill=255)
        elif kind in ("rect", "ellipse"):
            x0, y0, x1, y1 = part[1]
            box = (x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1))
            (draw.rectangle if kind == "rect" else draw.ellipse)(box, fill=255)
        elif kind == "ring":
            x0, y0, x1, y1 = part[1]
            width = max(1, round(part[2] * min(w, h)))
            draw.ellipse((x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1)), outline=255, width=width)


def render_product(spec: ProductSpec, w: int, h: int) -> tuple[Image.Image, Image.Image]:
    """The product's texture (RGB) and its shape mask (L), both w x h."""
    mask = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(mask), SHAPES[spec.category], w, h)
    texture = Image.new("RGB", (w, h), COLOURS[spec.colour])
    draw = ImageDraw.Draw(texture)
    second = COLOURS[spec.secondary]
    step = max(2, min(w, h) // spec.frequency)
    if spec.pattern == "striped":
        for x in range(0, w + h, step):
            draw.line([(x, 0), (x - h, h)], fill=second, width=max(1, step // 3))
    elif spec.pattern == "dotted":
        r = max(1, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=second)
    elif spec.pattern == "checked":
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=second)
    return texture, mask


def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.random()
    base = tuple(rng.randint(60, 235) for _ in range(3))
    if kind < 0.3:
        return Image.new("RGB", (size, size), base)
    if kind < 0.6:  # vertical gradient
        other = tuple(rng.randint(60, 235) for _ in range(3))
        column = Image.new("RGB", (1, 2))
        column.putpixel((0, 0), base)
        column.putpixel((0, 1), other)
        return column.resize((size, size), Image.BILINEAR)
    # blotchy texture: coarse noise, upsampled and blurred
    coarse = Image.new("RGB", (6, 6))
    for y in range(6):
        for x in range(6):
            coarse.putpixel((x, y), tuple(max(0, min(255, c + rng.randint(-50, 50))) for c in base))
    return coarse.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def _place(rng: random.Random, size: int, scale: tuple[float, float], aspect: float) -> tuple[int, int, int, int]:
    side = rng.uniform(*scale) * size
    w = max(4, round(side * min(1.0, aspect)))
    h = max(4, round(side * min(1.0, 1 / aspect)))
    x = rng.randint(0, size - w)
    y = rng.randint(0, size - h)
    return x, y, w, h


def render_listing(spec: ProductSpec, all_specs: list[ProductSpec], rng: random.Random, config: ShopSynthConfig) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One listing image of `spec` and the product's box (x0, y0, x1, y1), x1/y1 exclusive."""
    size = config.image_size
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 6)):  # clutter: lines and confetti
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.line([(rng.randint(0, size), rng.randint(0, size)) for _ in range(2)], fill=colour, width=rng.randint(1, 3))
        else:
            x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(1, 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    others = [s for s in all_specs if s.category != spec.category]
    distractors = [rng.choice(others) for _ in range(rng.randint(*config.distractors))]
    occluder = distractors.pop() if distractors and rng.random() < 0.2 else None

    def paste(s: ProductSpec, scale) -> tuple[int, int, int, int]:
        x, y, w, h = _place(rng, size, scale, s.aspect)
        texture, mask = render_product(s, w, h)
        image.paste(texture, (x, y), mask)
        bx0, by0, bx1, by1 = mask.getbbox() or (0, 0, w, h)
        return x + bx0, y + by0, x + bx1, y + by1

    for d in distractors:
        paste(d, config.distractor_scale)
    box = paste(spec, config.product_scale)
    if occluder is not None:  # a smaller object partly in front of the product
        paste(occluder, (config.distractor_scale[0] * 0.7, config.distractor_scale[0]))
    if rng.random() < 0.5:  # promo banner
        text = rng.choice(OVERLAY_TEXT)
        x, y = rng.randint(0, size - 40), rng.choice([rng.randint(0, 8), size - rng.randint(12, 18)])
        draw.rectangle((x, y, x + 6 * len(text) + 6, y + 12), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        draw.text((x + 3, y + 1), text, fill=(255, 255, 255))
    return image, box


def generate(out_dir: str | Path, config: ShopSynthConfig | None = None, progress: bool = True) -> dict[str, Path]:
    """Write images and three catalogs (all, train, heldout; split by product) under out_dir.
    Returns the catalog paths."""
    from tqdm import tqdm

    config = config or ShopSynthConfig()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    specs = [sample_product(rng, i) for i in range(config.num_products)]
    records = []
    for spec in tqdm(specs, desc="ShopSynth", unit="product", disable=not progress, leave=False):
        product_rng = random.Random(f"{config.seed}-{spec.product_id}")
        images = []
        for k in range(config.images_per_product):
            image, box = render_listing(spec, specs, product_rng, config)
            name = f"images/{spec.product_id}_{k}.png"
            image.save(out / name)
            images.append({"path": name, "box": list(box)})
        records.append({
            "product_id": spec.product_id,
            "title": make_title(spec, product_rng),
            "images": images,
            "category": spec.category,
            "attributes": {"colour": spec.colour, "pattern": spec.pattern, "secondary": spec.secondary, "brand": spec.brand},
        })
    order = list(range(len(records)))
    random.Random(config.seed + 1).shuffle(order)
    n_heldout = round(len(records) * config.heldout_fraction)
    heldout = set(order[:n_heldout])
    paths = {"all": out / "catalog.jsonl", "train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    subsets = {
        "all": records,
        "train": [r for i, r in enumerate(records) if i not in heldout],
        "heldout": [r for i, r in enumerate(records) if i in heldout],
    }
    for name, path in paths.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in subsets[name]), encoding="utf-8")
        tmp.replace(path)
    (out / "shopsynth.json").write_text(json.dumps(vars(config) | {"categories": list(SHAPES)}, indent=2))
    return paths
