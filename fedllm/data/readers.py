"""Data files (CSV, JSONL, JSON, Parquet) into validated rows, with errors that name file, row and field.

Every source's rows pass :func:`to_record`, so all formats accept and reject the same values. Row numbers in
error messages are counted the way a person finds the row in the file:

* CSV: the line number where the row starts; the header is line 1, so the first data row is row 2.
* JSONL: the line number (1-based; blank lines count as lines but hold no row).
* JSON (a list of objects) and Parquet: the 1-based position of the row (there are no header lines).
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

from fedllm.data.records import Record
from fedllm.errors import DataError

MAX_TEXT_CHARS = 100_000  # one row; a longer "text" is a misplaced document, refused with its row
SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def read_table(path: str | os.PathLike[str], text_column: str, label_column: str) -> list[tuple[str, str]]:
    """Read one data file into (text, label) pairs, raising a :class:`DataError` for anything unusable.

    The format follows the suffix (.csv, .jsonl, .json, .parquet). Labels are returned as strings
    (integers in the file become their decimal form) so that every format gives the same label space.
    """
    return [(r.text, r.label) for r in read_records(path, text_column, label_column)]


def read_records(path: str | os.PathLike[str], text_column: str, label_column: str) -> tuple[Record, ...]:
    """One file's validated rows, cached per process: stat first so the cache is keyed by mtime and size and a
    changed file is re-read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(str(p), "cannot read: no such file") from None
    except OSError as exc:
        raise DataError(str(p), f"cannot read: {exc.strerror or exc}") from None
    if p.is_dir():
        raise DataError(str(p), f"cannot read: is a directory, expected a {suffix_list()} file")
    return _read_records_cached(str(p), st.st_mtime_ns, st.st_size, text_column, label_column)


@functools.lru_cache(maxsize=64)
def _read_records_cached(
    path: str, _mtime_ns: int, _size: int, text_column: str, label_column: str
) -> tuple[Record, ...]:
    suffix = Path(path).suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        raise DataError(path, f"unsupported file type '{suffix or '(none)'}'; use {suffix_list()}")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    records = tuple(
        to_record(path, row, text, label, text_column, label_column)
        for row, text, label in parser(path, data, text_column, label_column)
    )
    if not records:
        raise DataError(path, "empty file: no data rows")
    return records


def suffix_list() -> str:
    """The supported file types, for messages."""
    return ", ".join(SUPPORTED_SUFFIXES)


def _decode(data: bytes) -> str:
    """Decode leniently: an undecodable byte becomes a lone surrogate, so the parser still finds the row and
    field it sits in and :func:`_reject_bad_bytes` can name both, instead of only a byte offset."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return data.decode("utf-8", errors="surrogateescape")


_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _reject_bad_bytes(path: str, row: int | None, values: Iterable[tuple[str | None, Any]]) -> None:
    """Raise for the first value holding a byte that was not UTF-8; field None when it is outside a field."""
    for field, value in values:
        found = _BAD_BYTE.search(value) if isinstance(value, str) else None
        if found:
            byte = ord(found.group()) - 0xDC00
            problem = f"not valid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8"
            raise DataError(path, problem, row=row, field=field)


_Raw = tuple[int, Any, Any]  # (row number, raw text value, raw label value)


def _parse_csv(path: str, data: bytes, text_column: str, label_column: str) -> Iterator[_Raw]:
    # The csv module's own cap (128 KiB) would hide an over-long text behind "malformed CSV"; read it,
    # then refuse it with its size and row.
    csv.field_size_limit(max(csv.field_size_limit(), 16 * MAX_TEXT_CHARS))
    reader = csv.reader(io.StringIO(_decode(data), newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(path, f"malformed CSV header: {exc}", row=1) from None
    _reject_bad_bytes(path, 1, ((None, name) for name in header))
    require_columns(path, header, (text_column, label_column), row=1)
    text_at, label_at = header.index(text_column), header.index(label_column)
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(path, f"malformed CSV: {exc}", row=start) from None
        if not fields:  # a blank line holds no row
            continue
        _reject_bad_bytes(path, start, ((header[i] if i < len(header) else None, v) for i, v in enumerate(fields)))
        yield start, _field_at(fields, text_at), _field_at(fields, label_at)


def _field_at(fields: list[str], at: int) -> str | None:
    """A short CSV row lacks trailing fields; treat them as missing so the value checks report them."""
    return fields[at] if at < len(fields) else None


def _iter_jsonl(path: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Split on '\\n' only: str.splitlines also breaks on U+2028 and friends, which are legal inside JSON
    strings and would shift the line numbers away from what an editor shows."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", row=line_no) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", row=line_no)
        if _BAD_BYTE.search(line):  # in a top-level value (named), else in a key or nested (row only)
            _reject_bad_bytes(path, line_no, obj.items())
            _reject_bad_bytes(path, line_no, [(None, line)])
        yield line_no, obj


def jsonl_objects(path: str, data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each row of JSONL bytes, decoded and checked as a ``.jsonl`` file is; ``path``
    names the data in errors (an archive member, for example)."""
    return _iter_jsonl(path, _decode(data))


def _parse_jsonl(path: str, data: bytes, text_column: str, label_column: str) -> Iterator[_Raw]:
    for row, obj in jsonl_objects(path, data):
        yield object_fields(path, row, obj, text_column, label_column)


def _parse_json(path: str, data: bytes, text_column: str, label_column: str) -> Iterator[_Raw]:
    text = _decode(data)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(items, list):
        raise DataError(path, f"expected a JSON list of objects, got {type(items).__name__}")
    has_bad_bytes = _BAD_BYTE.search(text) is not None
    for row, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", row=row)
        if has_bad_bytes:  # only then: a JSON escape like "\udc80" is legitimate and must pass
            _reject_bad_bytes(path, row, obj.items())
        yield object_fields(path, row, obj, text_column, label_column)
    found = _BAD_BYTE.search(text)  # one left in a key, a nested value or between objects
    if found:
        line = text.count("\n", 0, found.start()) + 1
        _reject_bad_bytes(f"{path}: line {line}", None, [(None, found.group())])


def object_fields(path: str, row: int, obj: Mapping[str, Any], text_column: str, label_column: str) -> _Raw:
    require_columns(path, list(obj), (text_column, label_column), row=row)
    return row, obj[text_column], obj[label_column]


def _parse_parquet(path: str, data: bytes, text_column: str, label_column: str) -> Iterator[_Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"not a readable Parquet file: {exc}") from None
    require_columns(path, table.column_names, (text_column, label_column))
    texts = table.column(text_column).to_pylist()
    labels = table.column(label_column).to_pylist()
    yield from zip(range(1, len(texts) + 1), texts, labels, strict=True)


_PARSERS: dict[str, Callable[[str, bytes, str, str], Iterator[_Raw]]] = {
    ".csv": _parse_csv,
    ".jsonl": _parse_jsonl,
    ".json": _parse_json,
    ".parquet": _parse_parquet,
}


def require_columns(path: str, present: Sequence[str], needed: Iterable[str], row: int | None = None) -> None:
    for column in needed:
        if column not in present:
            listed = ", ".join(repr(c) for c in present) or "(none)"
            raise DataError(path, f"missing column '{column}'; columns present: {listed}", row=row, field=column)


def to_record(path: str, row: int, text: Any, label: Any, text_column: str, label_column: str) -> Record:
    """The one place every source's rows are checked, so all formats accept and reject the same values."""
    if not isinstance(text, str) or not text.strip():
        problem = "empty text" if text is None or isinstance(text, str) else "text must be a string"
        if not (text is None or isinstance(text, str)):
            problem += f", got {type(text).__name__}"
        raise DataError(path, problem, row=row, field=text_column)
    if len(text) > MAX_TEXT_CHARS:
        # Truncation to max_length tokens would silently drop almost all of it: such a row is a data error
        # (a whole document pasted into one cell), not an example.
        raise DataError(
            path, f"text is {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}", row=row, field=text_column
        )
    return Record(text, _label_str(path, row, label, label_column), path, row, label_column)


def _label_str(path: str, row: int, value: Any, field: str) -> str:
    """Normalise to str so 3 in a Parquet int column and "3" in a CSV are the same label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(path, "missing label", row=row, field=field)
    if isinstance(value, bool):
        raise DataError(path, f"label must be a string or an integer, got {value!r}", row=row, field=field)
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, "missing label", row=row, field=field)
        return value.strip()
    raise DataError(path, f"label must be a string or an integer, got {type(value).__name__}", row=row, field=field)
