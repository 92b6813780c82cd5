"""CSV (product table) -> catalog JSON Lines.

Most product exports are a table with one row per product: an id, a title, a category and a
few attribute columns, with the image found from the id (`images/{id}.jpg`). This module turns
such a table into the catalog format that `load_catalog` reads. Like the catalog loader it never
dies on one bad row: a row that is not in the file's encoding, does not parse or has the wrong
number of columns, a row without id or title, a duplicate id, an image path that leaves the
image root (`../secret`) or a missing image is reported with file and line, skipped and counted.
A quote left open, which would swallow the rows after it into one field, is reported at its
line and the rows after it are read again. A mistake in the command (a column name the header
lacks, a bad template or delimiter, an output that cannot be written) fails at once with
`ImportArgumentError`, naming the argument, before any row is read.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from .catalog import CatalogError, CatalogReport
from .textfile import Line, UndecodableFile, read_lines

logger = logging.getLogger("eclip.data")


class ImportArgumentError(CatalogError):
    """A bad argument of `csv_to_catalog` (not a bad row); `argument` is its name."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


@dataclass
class ImportReport(CatalogReport):
    out: str = ""

    def summary(self) -> str:
        text = f"{self.path} -> {self.out}: {self.lines} rows read, {self.products} products written"
        if self.skipped:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped: {parts}"
        return text


def _require_columns(header: list[str], names: list[str], path: Path, argument: str) -> None:
    for name in names:
        if name not in header:
            available = ", ".join(header)
            raise ImportArgumentError(argument, f"{path}: no column {name!r}; the columns are: {available}")


def _check_template(template: str, header: list[str], path: Path) -> Path:
    """The folder every image path made from `template` must stay in when the template is
    absolute (its fixed part); raises ImportArgumentError on a template that cannot work: an
    unknown column, a positional field, attribute access, a nested or bad format spec."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ImportArgumentError("image_template", f"image template {template!r}: {error}") from None
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name not in header:
            raise ImportArgumentError("image_template", f"image template {template!r} uses {{{name}}}, but {path} has no such column; the columns are: {', '.join(header)}")
        if "{" in (spec or ""):
            raise ImportArgumentError("image_template", f"image template {template!r}: a field inside a format spec ({spec!r}) is not allowed")
    try:  # a conversion or spec that cannot format a column's text fails here, not on every row
        template.format(**dict.fromkeys(header, "x"))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:
        raise ImportArgumentError("image_template", f"image template {template!r}: {type(error).__name__}: {error}") from None
    fixed = parts[0][0] if parts and parts[0][1] is not None else template
    return Path(os.path.dirname(fixed) or ".")


def _check_output(out_path: Path) -> None:
    """Fail before reading a row if the catalog cannot be written."""
    if out_path.is_dir():
        raise ImportArgumentError("out", f"{out_path} is a folder; give a file name")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ImportArgumentError("out", f"cannot create the folder of {out_path} ({error.strerror})") from None
    if not os.access(out_path.parent, os.W_OK | os.X_OK):
        raise ImportArgumentError("out", f"cannot write to {out_path.parent} (permission denied)")


def _inside(path: Path, base: Path) -> bool:
    """Whether `path` is in `base`, by name (`..` resolved; symlinks inside are the owner's)."""
    path, base = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(base))
    return os.path.commonpath([path, base]) == base


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
    encoding: str = "utf-8",
) -> ImportReport:
    """Convert a product table to a catalog. Returns the report (counts, problems).

    image_template is formatted with the row's columns (`images/{id}.jpg`); a relative result is
    looked up under image_root, by default the CSV's folder, and must stay inside it. Image paths
    are written absolute, so the data can stay where it is while the catalog lives elsewhere;
    relative_paths writes them relative to the output file's folder instead (for a catalog moved
    together with its images). limit reads at most that many data rows. Each line is decoded
    with `encoding` on its own (a UTF-8 or UTF-16 byte-order mark is honoured).
    """
    csv_path, out_path = Path(csv_path), Path(out_path)
    if not csv_path.is_file():
        raise CatalogError(f"CSV {csv_path} does not exist")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\"":
        raise ImportArgumentError("delimiter", f"the delimiter must be one character (not a quote or a newline), not {delimiter!r}")
    if limit is not None and limit < 1:
        raise ImportArgumentError("limit", f"limit must be a positive number of rows, not {limit}")
    _check_output(out_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    attribute_columns = list(attribute_columns or [])
    report = ImportReport(str(csv_path), out=str(out_path))
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ImportArgumentError("encoding", f"unknown encoding {encoding!r}") from None
    try:
        lines = list(read_lines(csv_path, encoding))
    except UndecodableFile as error:
        raise CatalogError(f"CSV {error}") from None
    if not lines:
        raise CatalogError(f"{csv_path}: empty file (no header row)")
    if lines[0].text is None:
        raise ImportArgumentError("encoding", f"{csv_path}:1: the header is {lines[0].error}; give the file's encoding (e.g. cp1252)")
    try:
        header = [name.strip() for name in next(csv.reader([lines[0].text], delimiter=delimiter))]
    except (csv.Error, StopIteration) as error:
        raise CatalogError(f"{csv_path}:1: the header row does not parse ({error})") from None
    _require_columns(header, [id_column, title_column], csv_path, "columns")
    if category_column:
        _require_columns(header, [category_column], csv_path, "category_column")
    _require_columns(header, attribute_columns, csv_path, "attribute_columns")
    fixed_folder = _check_template(image_template, header, csv_path)
    base = fixed_folder if Path(image_template).is_absolute() else root
    index = {name: i for i, name in enumerate(header)}
    records: list[str] = []
    seen: set[str] = set()
    out_dir = out_path.parent.resolve()

    for start, row in _rows(lines, 1, delimiter, len(header), report, limit, encoding):
        record = _row_record(row, start, header, index, id_column, title_column, category_column,
                             attribute_columns, image_template, root, base, out_dir, relative_paths, seen, report)
        if record is not None:
            seen.add(record["product_id"])
            records.append(json.dumps(record, ensure_ascii=False) + "\n")
            report.products += 1
            report.images += 1

    try:  # a crash never leaves a half-written catalog behind
        atomic_write_text(out_path, "".join(records))
    except OSError as error:
        raise ImportArgumentError("out", f"cannot write {out_path} ({error.strerror or error})") from None
    logger.info(report.summary())
    return report


def _rows(lines: list[Line], first: int, delimiter: str, columns: int, report: ImportReport, limit: int | None,
          encoding: str) -> Iterator[tuple[int, list[str]]]:
    """The data rows from `lines[first]` on, as (first physical line, fields), each counted in
    `report.lines`; blank lines are passed over. A row that does not decode or does not parse is
    reported and skipped; so is a row whose quote was left open (see `_swallows`), and the lines
    it swallowed are read again as rows of their own."""
    k = first  # index in `lines` of the first line the current reader reads
    while k < len(lines):
        reader = csv.reader((line.text if line.text is not None else "\n" for line in lines[k:]), delimiter=delimiter, strict=True)
        restart = None
        while restart is None:
            if limit is not None and report.lines >= limit:
                return
            begin = k + reader.line_num  # index of this row's first line
            try:
                row = next(reader)
                error = None
            except StopIteration:
                return
            except csv.Error as problem:
                row, error = None, problem
            end = k + reader.line_num  # one past its last line
            span = lines[begin:end]
            if row is not None and len(span) == 1 and span[0].text is not None and all(not cell.strip() for cell in row):
                continue  # a blank line, or one of empty cells
            report.lines += 1
            if end - begin > 1 and (row is None or _swallows(row, span, delimiter, columns)):
                report.add(begin + 1, "unterminated quote",
                           f"a quote opened on this line runs over lines {begin + 2}-{end}" + (f" ({error})" if error else "")
                           + "; the row is skipped and those lines are read again")
                restart = begin + 1
                continue
            undecodable = next((line for line in span if line.text is None), None)
            if undecodable is not None:
                report.add(undecodable.number, "undecodable row", f"{undecodable.error}; give the file's encoding if it is not {encoding}")
                continue
            if error is not None:
                report.add(begin + 1, "unparseable row", f"unparseable row ({error})")
                continue
            yield begin + 1, row
        k = restart


def _swallows(row: list[str], span: list[Line], delimiter: str, columns: int) -> bool:
    """Whether a row over several lines is a quote left open rather than a quoted field with
    line breaks: the row has the wrong number of columns, or every line after its first reads
    as a whole row on its own."""
    if len(row) != columns:
        return True
    for line in span[1:]:
        try:
            alone = next(csv.reader([line.text or ""], delimiter=delimiter, strict=True), [])
        except csv.Error:
            return False
        if len(alone) != columns:
            return False
    return True


def _row_record(row, line, header, index, id_column, title_column, category_column, attribute_columns,
                image_template, root, base, out_dir, relative_paths, seen, report) -> dict | None:
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
    try:
        image = Path(image_template.format(**values))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:  # a spec this row's text does not fit
        report.add(line, "bad image path", f"product {product_id}: image template {image_template!r} does not format ({error})")
        return None
    if not image.is_absolute():
        image = root / image
    if not _inside(image, base):
        report.add(line, "bad image path", f"product {product_id}: image path {image} leaves {base} (refused)")
        return None
    try:
        found = image.is_file()
    except (OSError, ValueError) as error:  # a NUL byte or a name too long for the filesystem
        report.add(line, "bad image path", f"product {product_id}: image path unusable ({error})")
        return None
    if not found:
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
