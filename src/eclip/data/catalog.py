"""The catalog: JSON Lines, one product per line.

    {"product_id": "p1", "title": "Acme red striped tee",
     "images": ["imgs/p1_0.jpg", {"path": "imgs/p1_1.jpg", "box": [12, 30, 80, 96]}],
     "category": "t-shirt", "attributes": {"colour": "red"}}

Image paths are relative to the catalog file. A box is (x0, y0, x1, y1) in pixels of its image.
An image entry's other fields (a composed scene's `occlusion`, `distractors`, ...) are kept as
they are in `ProductImage.metadata`.
Loading validates every line: a line that is not UTF-8 or not JSON, a missing field, a field
of the wrong type (`RECORD_SCHEMA`), an empty title, a duplicate product id, a bad box or an
unreadable image (or one over the pixel limit) is reported with file and line, skipped and
counted. A UTF-8 byte-order mark is accepted, a UTF-16 file read (`eclip.data.textfile`). A run
never dies on one bad record; it fails with `CatalogError` only if nothing usable is left.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .textfile import UndecodableFile, read_lines
from .transforms import ImageTooLarge, open_image

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


def _check_image(path: Path) -> tuple[int, int]:
    """Decode the image fully (a truncated file fails here, not hours into a run); one over
    the pixel limit is refused before decoding (ImageTooLarge)."""
    with open_image(str(path)) as image:
        image.load()
        return image.size


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


# The record's fields: (required, test, what it must be). JSON booleans are not numbers here
# (Python's True is an int), and an id must be a string or an integer, never null or an object.
RECORD_SCHEMA = {
    "product_id": (True, lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)), "a string or an integer"),
    "title": (True, lambda v: isinstance(v, str), "a string"),
    "images": (True, lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of image paths or {\"path\": ..., \"box\": ...} objects"),
    "category": (False, lambda v: v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)), "a string or null"),
    "attributes": (False, lambda v: v is None or (isinstance(v, dict) and all(_is_scalar(x) for x in v.values())),
                   "an object of strings, numbers, booleans or nulls"),
}


def check_record(record) -> tuple[str, str] | None:
    """The first way `record` breaks RECORD_SCHEMA, as (reason, detail), or None."""
    if not isinstance(record, dict):
        return "malformed line", f"a line must be a JSON object, not {type(record).__name__}"
    for name, (required, test, expected) in RECORD_SCHEMA.items():
        if name not in record:
            if required:
                return "missing field", f"missing field {name!r}"
            continue
        if not test(record[name]):
            return "wrong type", f"{name!r} must be {expected}, not {_short(record[name])}"
    return None


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_box(raw, width: int, height: int) -> tuple[float, float, float, float]:
    if not (isinstance(raw, (list, tuple)) and len(raw) == 4 and all(_is_number(v) for v in raw)):
        raise ValueError(f"box must be [x0, y0, x1, y1] (four numbers), not {_short(raw)}")
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
    try:
        for line in read_lines(path):
            report.lines += 1
            if line.text is None:
                report.add(line.number, "undecodable line", f"{line.error}; a catalog is UTF-8")
                continue
            if not line.text.strip():
                continue
            product = _parse_line(line.text, line.number, root, seen, report, check_images)
            if product is not None:
                seen.add(product.product_id)
                products.append(product)
                report.products += 1
                report.images += len(product.images)
    except UndecodableFile as error:
        raise CatalogError(f"catalog {error}") from None
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
    problem = check_record(record)
    if problem is not None:
        report.add(number, *problem)
        return None
    product_id = str(record["product_id"]).strip()
    title = record["title"]
    if not product_id:
        report.add(number, "missing field", "empty product_id")
        return None
    if not title.strip():
        report.add(number, "empty title", f"product {product_id}: empty title")
        return None
    if product_id in seen:
        report.add(number, "duplicate product id", f"duplicate product_id {product_id!r}")
        return None
    raw_images = record["images"]
    images = []
    for entry in raw_images:
        image = _parse_image(entry, number, root, product_id, report, check_images)
        if image is not None:
            images.append(image)
    if not images:
        report.add(number, "no usable image", f"product {product_id}: no usable image")
        return None
    category = record.get("category")
    return Product(
        product_id=product_id,
        title=title.strip(),
        images=images,
        category=None if category is None else str(category),
        attributes=record.get("attributes") or {},
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
    try:
        image_path = Path(entry) if Path(entry).is_absolute() else root / entry
        found = image_path.is_file()
    except (OSError, ValueError) as error:  # a NUL byte, a name too long for the filesystem
        report.add(number, "unreadable image", f"product {product_id}: image path {_short(entry)} unusable ({error})")
        return None
    if not found:
        report.add(number, "unreadable image", f"product {product_id}: image {image_path} not found")
        return None
    width = height = None
    if check_images or box_raw is not None:
        try:
            width, height = _check_image(image_path)
        except ImageTooLarge as error:
            report.add(number, "image too large", f"product {product_id}: image {image_path} refused: {error}")
            return None
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
