"""Metadata filters and facet counts for a `ProductIndex`: one column per metadata key over the
index's vector ids, so a filter is a few vectorised comparisons and a facet count a bincount.

A product's facets are its scalar top-level metadata (`category`, `brand`, `price`, ...) and the
scalar values of its `attributes` (a top-level key wins over an attribute of the same name).
Filters: equality on any facet (several values of one key: any of them), numeric ranges
(`gte`/`lte`) on numeric facets; conditions on different keys must all hold. Strings compare
case-insensitively.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# metadata keys that describe a product but are not facets
NOT_FACETS = {"title", "image_paths", "images", "image_path", "product_id", "attributes", "description"}
MAX_FACET_VALUES = 100  # keys with more distinct values (ids, prices) filter but are not counted
TOP_FACET_VALUES = 20  # values reported per facet, most frequent first
_EXPRESSION = re.compile(r"^\s*([^=<>\s][^=<>]*?)\s*(>=|<=|=)\s*(.*?)\s*$")


class FilterError(ValueError):
    """A filter that cannot be applied: bad syntax, an unknown key, a range on a text facet."""


@dataclass(frozen=True)
class Condition:
    key: str
    values: frozenset[str] | None = None  # equality: any of these (case-folded text)
    low: float | None = None  # range: low <= value <= high (either side open)
    high: float | None = None


def _text(value) -> str:
    """The comparable text of a facet value: 42, 42.0 and "42" are the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().casefold()


def _number(value) -> float:
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def product_facets(meta: dict) -> dict[str, object]:
    """The facet values of one product's metadata (module doc)."""
    out: dict[str, object] = {}
    attributes = meta.get("attributes")
    if isinstance(attributes, dict):
        out.update((k, v) for k, v in attributes.items() if isinstance(v, (str, int, float, bool)) and v != "")
    out.update((k, v) for k, v in meta.items()
               if k not in NOT_FACETS and isinstance(v, (str, int, float, bool)) and v != "")
    return out


def parse_expression(text: str) -> tuple[str, str, str]:
    """`key=value`, `key>=x` or `key<=y` -> (key, operator, value)."""
    match = _EXPRESSION.match(text)
    if not match or not match.group(3):
        raise FilterError(f"bad filter {text!r}: write key=value, key>=number or key<=number")
    return match.group(1), match.group(2), match.group(3)


def parse_filters(filters) -> list[Condition]:
    """A filter spec -> conditions, one per key. Accepted: None; a list of expressions
    (`["gender=Men", "price>=10"]`, repeated `key=` means any of the values); or a dict
    `{key: value | [values] | {"gte": x, "lte": y}}`."""
    if not filters:
        return []
    equal: dict[str, set[str]] = {}
    ranges: dict[str, list[float | None]] = {}

    def bound(key: str, op: str, value) -> None:
        number = _number(value)
        if math.isnan(number):
            raise FilterError(f"filter {key}{op}{value!r}: a range needs a number")
        low_high = ranges.setdefault(key, [None, None])
        if op == ">=":
            low_high[0] = number if low_high[0] is None else max(low_high[0], number)
        else:
            low_high[1] = number if low_high[1] is None else min(low_high[1], number)

    if isinstance(filters, dict):
        for key, spec in filters.items():
            if not isinstance(key, str) or not key.strip():
                raise FilterError(f"filter keys must be non-empty strings, got {key!r}")
            if isinstance(spec, dict):
                unknown = set(spec) - {"gte", "lte"}
                if unknown or not spec:
                    raise FilterError(f"filter {key!r}: a range is {{\"gte\": x, \"lte\": y}}, got keys {sorted(spec)}")
                for name, value in spec.items():
                    bound(key, ">=" if name == "gte" else "<=", value)
            else:
                values = spec if isinstance(spec, list) else [spec]
                if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
                    raise FilterError(f"filter {key!r}: give a value, a list of values or a range, got {spec!r}")
                equal.setdefault(key, set()).update(_text(v) for v in values)
    elif isinstance(filters, (list, tuple)):
        for item in filters:
            if not isinstance(item, str):
                raise FilterError(f"filter expressions must be strings, got {item!r}")
            key, op, value = parse_expression(item)
            if op == "=":
                equal.setdefault(key, set()).add(_text(value))
            else:
                bound(key, op, value)
    else:
        raise FilterError(f"filters must be a list of key=value expressions or an object, got {type(filters).__name__}")
    return ([Condition(k, values=frozenset(v)) for k, v in equal.items()]
            + [Condition(k, low=lo, high=hi) for k, (lo, hi) in ranges.items()])


class _Column:
    def __init__(self, capacity: int):
        self.codes = np.full(capacity, -1, dtype=np.int32)  # vector id -> value code (-1: none)
        self.numbers = np.full(capacity, np.nan)  # vector id -> numeric value (NaN: none)
        self.values: list[str] = []  # code -> the value as first seen (for display)
        self.lookup: dict[str, int] = {}  # comparable text -> code

    def code(self, value) -> int:
        text = _text(value)
        code = self.lookup.get(text)
        if code is None:
            code = self.lookup[text] = len(self.values)
            self.values.append(value if isinstance(value, str) else _text(value))
        return code


class FacetColumns:
    """Per vector id: whether it is live, whether it is its product's first vector (facet counts
    count products once), and each facet's value. Not thread-safe: the index's lock guards it."""

    def __init__(self):
        self.capacity = 0
        self.live = np.zeros(0, dtype=bool)
        self.primary = np.zeros(0, dtype=bool)
        self.columns: dict[str, _Column] = {}

    def grow(self, size: int) -> None:
        if size <= self.capacity:
            return
        capacity = max(size, 2 * self.capacity, 1024)
        self.live = np.concatenate([self.live, np.zeros(capacity - self.capacity, dtype=bool)])
        self.primary = np.concatenate([self.primary, np.zeros(capacity - self.capacity, dtype=bool)])
        for column in self.columns.values():
            column.codes = np.concatenate([column.codes, np.full(capacity - self.capacity, -1, dtype=np.int32)])
            column.numbers = np.concatenate([column.numbers, np.full(capacity - self.capacity, np.nan)])
        self.capacity = capacity

    def set_products(self, products: list[tuple[list[int], dict]]) -> None:
        """(vector ids, metadata) per product: mark the vectors live and set their facets."""
        per_key: dict[str, tuple[list[int], list[object]]] = {}
        for vids, meta in products:
            self.live[vids] = True
            self.primary[vids[0]] = True
            for key, value in product_facets(meta).items():
                ids, values = per_key.setdefault(key, ([], []))
                ids.extend(vids)
                values.extend([value] * len(vids))
        for key, (ids, values) in per_key.items():
            column = self.columns.get(key)
            if column is None:
                column = self.columns[key] = _Column(self.capacity)
            index = np.asarray(ids, dtype=np.int64)
            column.codes[index] = [column.code(v) for v in values]
            column.numbers[index] = [_number(v) for v in values]

    def clear(self, vids: np.ndarray) -> None:
        self.live[vids] = False
        self.primary[vids] = False
        for column in self.columns.values():
            column.codes[vids] = -1
            column.numbers[vids] = np.nan

    def keep(self, live: np.ndarray) -> None:
        """Renumber after a compaction: vector `live[i]` becomes vector i."""
        self.live, self.primary = self.live[live], self.primary[live]
        for column in self.columns.values():
            column.codes, column.numbers = column.codes[live], column.numbers[live]
        self.capacity = len(live)

    def check(self, conditions: list[Condition]) -> None:
        for c in conditions:
            if c.key not in self.columns:
                known = ", ".join(sorted(self.columns)) or "none"
                raise FilterError(f"no product has the facet {c.key!r}; facets: {known}")

    def mask(self, conditions: list[Condition], n: int, skip: str | None = None) -> np.ndarray:
        """Live vector ids below n that meet every condition (but those on key `skip`)."""
        out = self.live[:n].copy()
        for c in conditions:
            if c.key == skip:
                continue
            column = self.columns[c.key]
            if c.values is not None:
                codes = [column.lookup[v] for v in c.values if v in column.lookup]
                if len(codes) == 1:  # the common case: a comparison, several times faster than isin
                    out &= column.codes[:n] == codes[0]
                else:
                    out &= np.isin(column.codes[:n], codes)
            else:
                numbers = column.numbers[:n]
                with np.errstate(invalid="ignore"):  # NaN (no value) compares false: excluded
                    if c.low is not None:
                        out &= numbers >= c.low
                    if c.high is not None:
                        out &= numbers <= c.high
        return out

    def counts(self, conditions: list[Condition], n: int, top: int = TOP_FACET_VALUES) -> dict[str, dict[str, int]]:
        """Products per value of every facet with at most MAX_FACET_VALUES values, under the
        filters; a key's own condition is left out of its counts, so its other values stay
        visible (choosing one more widens the result)."""
        out: dict[str, dict[str, int]] = {}
        base = self.mask(conditions, n) & self.primary[:n]
        for key in sorted(self.columns):
            column = self.columns[key]
            if len(column.values) > MAX_FACET_VALUES:
                continue
            own = any(c.key == key for c in conditions)
            selected = (self.mask(conditions, n, skip=key) & self.primary[:n]) if own else base
            codes = column.codes[:n][selected]
            counts = np.bincount(codes[codes >= 0], minlength=len(column.values))
            order = np.argsort(-counts, kind="stable")[:top]
            values = {column.values[i]: int(counts[i]) for i in order if counts[i] > 0}
            if values:
                out[key] = values
        return out
