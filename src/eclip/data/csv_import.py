"""CSV (product table) -> catalog JSON Lines.

Most product exports are a table with one row per product: an id, a title, a category and a
few attribute columns, with the image found from the id (`images/{id}.jpg`). This module turns
such a table into the catalog format that `load_catalog` reads. Like the catalog loader it never
dies on one bad row: a row without id or title, a row that does not parse or has the wrong
number of columns, a duplicate id or a missing image is reported with file and line, skipped and
counted. A column name that the header lacks is a mistake in the command, not in the data, so it
fails at once, naming the column and listing the ones that exist.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import string
from dataclasses import dataclass
from pathlib import Path

from .catalog import CatalogError, CatalogReport

logger = logging.getLogger("eclip.data")


@dataclass
class ImportReport(CatalogReport):
    out: str = ""

    def summary(self) -> str:
        text = f"{self.path} -> {self.out}: {self.lines} rows read, {self.products} products written"
        if self.skipped:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped: {parts}"
        return text


def _require_columns(header: list[str], names: list[str], path: Path) -> None:
    for name in names:
        if name not in header:
            available = ", ".join(header)
            raise CatalogError(f"{path}: no column {name!r}; the columns are: {available}")


def _template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise CatalogError(f"image template {template!r}: {error}") from error


def csv_to_catalog(
    csv_path: str | Path,
    out_path: str | Path,
    *,
    id_column: str = "id",
    title_column: str = "productDisplayName",
    image_template: str = "images/{id}.jpg",
    image_root: str | Path | None = None,
    category_column: str | None = None,
    attribute_columns: list[str] | None = None,
    limit: int | None = None,
    delimiter: str = ",",
    relative_paths: bool = False,
) -> ImportReport:
    """Convert a product table to a catalog. Returns the report (counts, problems).

    image_template is formatted with the row's columns (`images/{id}.jpg`); a relative result is
    looked up under image_root, by default the CSV's folder. Image paths are written absolute, so
    the data can stay where it is while the catalog lives elsewhere; relative_paths writes them
    relative to the output file's folder instead (for a catalog moved together with its images).
    limit reads at most that many data rows.
    """
    csv_path, out_path = Path(csv_path), Path(out_path)
    if not csv_path.is_file():
        raise CatalogError(f"CSV {csv_path} does not exist")
    root = Path(image_root) if image_root is not None else csv_path.parent
    attribute_columns = list(attribute_columns or [])
    report = ImportReport(str(csv_path), out=str(out_path))
    records: list[str] = []
    seen: set[str] = set()
    out_dir = out_path.parent.resolve()

    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would otherwise
    # become part of the first column's name
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise CatalogError(f"{csv_path}: empty file (no header row)") from None
        wanted = [id_column, title_column, *([category_column] if category_column else []), *attribute_columns]
        _require_columns(header, wanted, csv_path)
        template_fields = _template_fields(image_template)
        for name in template_fields:
            if name not in header:
                raise CatalogError(f"image template {image_template!r} uses {{{name}}}, but {csv_path} has no such column; the columns are: {', '.join(header)}")
        index = {name: i for i, name in enumerate(header)}

        previous_line = reader.line_num
        while limit is None or report.lines < limit:
            start = previous_line + 1  # the row's first physical line (a quoted field may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                report.lines += 1
                report.add(start, "unparseable row", f"unparseable row ({error})")
                previous_line = reader.line_num
                continue
            previous_line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            report.lines += 1
            record = _row_record(row, start, header, index, id_column, title_column, category_column,
                                 attribute_columns, image_template, root, out_dir, relative_paths, seen, report)
            if record is not None:
                seen.add(record["product_id"])
                records.append(json.dumps(record, ensure_ascii=False) + "\n")
                report.products += 1
                report.images += 1

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(records), encoding="utf-8")
    tmp.replace(out_path)  # a crash never leaves a half-written catalog behind
    logger.info(report.summary())
    return report


def _row_record(row, line, header, index, id_column, title_column, category_column, attribute_columns,
                image_template, root, out_dir, relative_paths, seen, report) -> dict | None:
    if len(row) != len(header):
        # usually an unquoted delimiter inside a title: the fields after it are shifted, so
        # nothing in the row can be trusted
        report.add(line, "wrong column count", f"{len(row)} columns, the header has {len(header)}")
        return None
    values = {name: row[i].strip() for name, i in index.items()}
    product_id = values[id_column]
    if not product_id:
        report.add(line, "missing id", f"empty {id_column!r}")
        return None
    title = values[title_column]
    if not title:
        report.add(line, "empty title", f"product {product_id}: empty {title_column!r}")
        return None
    if product_id in seen:
        report.add(line, "duplicate id", f"duplicate {id_column} {product_id!r}")
        return None
    image = Path(image_template.format(**values))
    if not image.is_absolute():
        image = root / image
    if not image.is_file():
        report.add(line, "missing image", f"product {product_id}: image {image} not found")
        return None
    image = image.resolve()
    path = os.path.relpath(image, out_dir) if relative_paths else str(image)
    record: dict = {"product_id": product_id, "title": title, "images": [path]}
    if category_column and values[category_column]:
        record["category"] = values[category_column]
    attributes = {name: values[name] for name in attribute_columns if values[name]}
    if attributes:
        record["attributes"] = attributes
    return record
