"""Where fedllm finds shared data and keeps its cache.

Both are environment variables with defaults so that CI, a laptop and a hospital node can point them
elsewhere without code changes.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The read-only shared folder (data sets, notes): ``$FEDLLM_SHARED`` or ``../shared``."""
    return Path(os.environ.get("FEDLLM_SHARED", PROJECT_ROOT.parent / "shared"))


def shared_data_dir() -> Path:
    return shared_dir() / "data"


def cache_dir() -> Path:
    """Downloaded, hash-checked artefacts: ``$FEDLLM_CACHE`` or ``~/.cache/fedllm``."""
    path = Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path
