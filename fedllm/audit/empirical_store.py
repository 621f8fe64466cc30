"""``DIR/empirical/result.json``: the one writer and reader of an empirical audit's stored result.

The file may hold the coins (the per-canary scores written after a run): it is private, like the auditor's
canary file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedllm.audit.empirical_result import EmpiricalResult
from fedllm.errors import FedllmError
from fedllm.files import PRIVATE_MODE, atomic_write_json
from fedllm.run.rundir import RunDir


def save_result(run_dir: Path, result: EmpiricalResult, scores: Sequence[dict[str, Any]] | None = None) -> None:
    data = result.to_dict() if scores is None else {**result.to_dict(), "scores": list(scores)}
    atomic_write_json(RunDir(run_dir).empirical_result_path, data, indent=1, mode=PRIVATE_MODE)


def load_result(run_dir: Path) -> EmpiricalResult | None:
    """The empirical audit stored with the run in ``run_dir``; None when there is none."""
    path = RunDir(run_dir).empirical_result_path
    if not path.is_file():
        return None
    try:
        return EmpiricalResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise FedllmError(f"{path}: unreadable empirical audit result ({exc})") from exc
