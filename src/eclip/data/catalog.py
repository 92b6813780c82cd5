"""The catalog: JSON Lines, one product per line.

    {"product_id": "p1", "title": "Acme red striped tee",
     "images": ["imgs/p1_0.jpg", {"path": "imgs/p1_1.jpg", "box": [12, 30, 80, 96]}],
     "category": "t-shirt", "attributes": {"colour": "red"}}

Image paths are relative to the catalog file. A box is (x0, y0, x1, y1) in pixels of its image.
An image entry's other fields (a composed scene's `occlusion`, `distractors`, ...) are kept as
they are in `ProductImage.metadata`.
Loading validates every line: a malformed line, a missing field, an empty title, a duplicate
product id or an unreadable image is reported with file and line, skipped and counted. A run
never dies on one bad record; it fails with `CatalogError` only if nothing usable is left.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

logger = logging.getLogger("eclip.data")


class CatalogError(ValueError):
    pass


@dataclass
class ProductImage:
    path: str  # absolute path
    box: tuple[float, float, float, float] | None = None  # fractions of width and height
    # the entry's other fields as written (e.g. a composed scene's occlusion, distractors, regime)
    metadata: dict = field(default_factory=dict)


@dataclass
class Product:
    product_id: str
    title: str
    images: list[ProductImage]
    category: str | None = None
    attributes: dict = field(default_factory=dict)


@dataclass
class CatalogReport:
    path: str
    lines: int = 0
    products: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    problems: list[str] = field(default_factory=list)  # "file:line: reason"

    def add(self, line: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        message = f"{self.path}:{line}: {detail}"
        self.problems.append(message)
        logger.warning(message)

    def summary(self) -> str:
        text = f"catalog {self.path}: {self.products} products, {self.images} images kept"
        if self.skipped:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped: {parts}"
        return text


def _check_image(path: Path, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Decode the image fully (a truncated file fails here, not hours into a run)."""
    with Image.open(path) as image:
        image.load()
        return image.size


def _parse_box(raw, width: int, height: int) -> tuple[float, float, float, float]:
    if not (isinstance(raw, (list, tuple)) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)):
        raise ValueError(f"box must be [x0, y0, x1, y1], got {raw!r}")
    x0, y0, x1, y1 = (float(v) for v in raw)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {raw!r} is empty or outside the {width}x{height} image")
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def load_catalog(path: str | Path, check_images: bool = True) -> tuple[list[Product], CatalogReport]:
    """Read and validate a catalog. Returns the usable products and the report."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist")
    root = path.parent
    report = CatalogReport(str(path))
    products: list[Product] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            report.lines += 1
            if not line.strip():
                continue
            product = _parse_line(line, number, root, seen, report, check_images)
            if product is not None:
                seen.add(product.product_id)
                products.append(product)
                report.products += 1
                report.images += len(product.images)
    logger.info(report.summary())
    if not products:
        raise CatalogError(f"{report.summary()}: no usable product left")
    return products, report


def _parse_line(line, number, root, seen, report, check_images) -> Product | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        report.add(number, "malformed line", f"malformed JSON ({error.msg})")
        return None
    if not isinstance(record, dict):
        report.add(number, "malformed line", "a line must be a JSON object")
        return None
    for name in ("product_id", "title", "images"):
        if name not in record:
            report.add(number, "missing field", f"missing field {name!r}")
            return None
    product_id = str(record["product_id"]).strip()
    title = record["title"]
    if not product_id:
        report.add(number, "missing field", "empty product_id")
        return None
    if not isinstance(title, str) or not title.strip():
        report.add(number, "empty title", f"product {product_id}: empty title")
        return None
    if product_id in seen:
        report.add(number, "duplicate product id", f"duplicate product_id {product_id!r}")
        return None
    raw_images = record["images"]
    if not isinstance(raw_images, list) or not raw_images:
        report.add(number, "no usable image", f"product {product_id}: 'images' must be a non-empty list")
        return None
    images = []
    for entry in raw_images:
        image = _parse_image(entry, number, root, product_id, report, check_images)
        if image is not None:
            images.append(image)
    if not images:
        report.add(number, "no usable image", f"product {product_id}: no usable image")
        return None
    attributes = record.get("attributes") or {}
    category = record.get("category")
    return Product(
        product_id=product_id,
        title=title.strip(),
        images=images,
        category=None if category is None else str(category),
        attributes=attributes if isinstance(attributes, dict) else {},
    )


def _parse_image(entry, number, root, product_id, report, check_images) -> ProductImage | None:
    box_raw = None
    metadata = {}
    if isinstance(entry, dict):
        box_raw = entry.get("box")
        metadata = {k: v for k, v in entry.items() if k not in ("path", "box")}
        entry = entry.get("path")
    if not isinstance(entry, str) or not entry:
        report.add(number, "bad image entry", f"product {product_id}: image entry {entry!r} has no path")
        return None
    if "://" in entry:
        report.add(number, "unreadable image", f"product {product_id}: remote image {entry} (download it first; only local paths are read)")
        return None
    image_path = Path(entry) if Path(entry).is_absolute() else root / entry
    if not image_path.is_file():
        report.add(number, "unreadable image", f"product {product_id}: image {image_path} not found")
        return None
    width = height = None
    if check_images or box_raw is not None:
        try:
            width, height = _check_image(image_path)
        except Exception as error:  # PIL raises many types for broken files
            report.add(number, "unreadable image", f"product {product_id}: image {image_path} unreadable ({error})")
            return None
    box = None
    if box_raw is not None:
        try:
            box = _parse_box(box_raw, width, height)
        except ValueError as error:
            report.add(number, "bad box", f"product {product_id}: image {image_path}: {error}")
            return None
    return ProductImage(path=str(image_path), box=box, metadata=metadata)
