"""Where fedllm finds shared data, keeps its cache, and (in a checkout) its own project tree.

The first two are environment variables with defaults so that CI, a laptop and a hospital node can point
them elsewhere without code changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedllm.errors import FedllmError

# The folder above the fedllm package: the checkout in a source or editable install, site-packages in a
# wheel install. Use project_tree() for what needs the checkout itself.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def has_project_tree(root: Path = PROJECT_ROOT) -> bool:
    """Whether ``root`` is fedllm's own checkout (its pyproject.toml and the package beside it)."""
    return (root / "pyproject.toml").is_file() and (root / "fedllm" / "__init__.py").is_file()


def project_tree(purpose: str) -> Path:
    """The checkout fedllm runs from; one clear error where it was installed from a wheel without one."""
    if not has_project_tree():
        raise FedllmError(f"{purpose} needs fedllm's project tree, but fedllm is installed without it ({PROJECT_ROOT})")
    return PROJECT_ROOT


def shared_dir() -> Path:
    """The read-only shared folder (data sets, notes): ``$FEDLLM_SHARED`` or ``shared/`` beside the checkout."""
    return Path(os.environ.get("FEDLLM_SHARED", PROJECT_ROOT.parent / "shared"))


def shared_data_dir() -> Path:
    return shared_dir() / "data"


def cache_dir() -> Path:
    """Downloaded, hash-checked artefacts: ``$FEDLLM_CACHE`` or ``~/.cache/fedllm``."""
    path = Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path
