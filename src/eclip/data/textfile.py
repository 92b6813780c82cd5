"""Text files read line by line, each line decoded on its own: one bad byte costs its line (the
caller reports `file:line`, skips and counts it), never the file. A UTF-8 byte-order mark is
dropped; a UTF-16 or UTF-32 file (by its byte-order mark) is decoded as such; one that looks
like UTF-16 without a mark (NUL bytes between the characters) is refused in one line."""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# longest first: the UTF-32 little-endian mark starts with the UTF-16 one
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class UndecodableFile(ValueError):
    """The whole file cannot be read as text (the message names it and says why)."""


@dataclass
class Line:
    number: int  # 1-based physical line
    text: str | None  # with its line ending; None when it does not decode
    error: str = ""  # why it does not decode


def read_lines(path: str | Path, encoding: str = "utf-8") -> Iterator[Line]:
    """The physical lines of `path`, each decoded with `encoding` on its own."""
    path = Path(path)
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise UndecodableFile(f"unknown encoding {encoding!r}") from None
    with path.open("rb") as handle:
        if codec.startswith(("utf-16", "utf-32")):  # asked for: its lines cannot be split as bytes
            yield from _wide_lines(path, handle.read(), codec)
            return
        head = handle.read(4096)
        handle.seek(0)
        for bom, wide in _WIDE_BOMS:
            if head.startswith(bom):
                yield from _wide_lines(path, handle.read(), wide)
                return
        if head.count(b"\x00") > len(head) // 4:
            raise UndecodableFile(f"{path}: NUL bytes between the characters: UTF-16 without a byte-order mark, or not text; save it as UTF-8")
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8) and codec == "utf-8":
                raw = raw[len(codecs.BOM_UTF8):]  # a spreadsheet's mark, not part of the first field
            try:
                yield Line(number, raw.decode(encoding))
            except UnicodeDecodeError as error:
                bad = raw[error.start : error.start + 1]
                yield Line(number, None, f"not {encoding} (byte 0x{bad.hex()} at column {error.start + 1})")


def _wide_lines(path: Path, data: bytes, encoding: str) -> Iterator[Line]:
    try:
        text = data.decode(encoding)  # the codec reads and drops the byte-order mark
    except UnicodeDecodeError as error:
        raise UndecodableFile(f"{path}: {encoding} (by its byte-order mark) but does not decode at byte {error.start}; save it as UTF-8") from None
    for number, line in enumerate(io.StringIO(text, newline=""), start=1):
        yield Line(number, line)
