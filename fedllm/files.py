"""Atomic file writes: the one way fedllm replaces a file.

Every record a run keeps (metrics, checkpoint, reports, the auditor's canary file, caches shared by Ray
actors) is read while it may be rewritten, and a crash must leave the old file or the new one, never half
of one. A unique temporary file in the same folder, fsync'd, then ``os.replace``: atomic on POSIX, and two
writers racing for the same name never share a temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600


def temp_beside(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> Path:
    """``data`` in a fresh temporary file in ``path``'s folder, mode ``mode`` from its first byte, fsync'd."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want; it can never have added any
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> Path:
    """Replace ``path`` with ``data`` (mode ``mode`` from its first byte); returns ``path``."""
    tmp = temp_beside(path, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


def create_new(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> bool:
    """Create ``path`` complete with ``data`` unless it exists (then False, the file untouched).

    ``link`` fails atomically when the name exists, so two processes racing to create it never both win
    and an existing file (a key others trust) is never replaced.
    """
    tmp = temp_beside(path, data, mode=mode)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, *, mode: int = PUBLIC_MODE) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, data: Any, *, indent: int | None = 2, mode: int = PUBLIC_MODE) -> Path:
    """JSON without NaN or infinity (``allow_nan=False``): other tools must be able to read it."""
    return atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n", mode=mode)
