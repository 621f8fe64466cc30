"""The report files: ``report.json``, ``report.md`` and ``report.html`` with the same facts.

For a run directory, its own report (``fedllm.report.facts``). For a folder whose sub-folders are runs
(``fedllm report runs/``), each run's report and then, in the folder, the comparison of all of them:
``report.json`` (schema ``fedllm-comparison``), ``report.md`` and ``report.html`` with the accuracy-vs-epsilon
curve (``fedllm.report.curve``). Every file is replaced atomically (``fedllm.files``): a reader never sees
half a report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedllm.errors import FedllmError
from fedllm.files import atomic_write_text
from fedllm.report.curve import build_comparison, runs_in
from fedllm.report.facts import build_report
from fedllm.report.html import render_comparison_html, render_html
from fedllm.report.markdown import render_comparison_markdown, render_markdown
from fedllm.run.rundir import RunDir


def _write(
    rd: RunDir, facts: dict[str, Any], md: Callable[[dict], str], page: Callable[[dict], str]
) -> dict[str, Path]:
    texts = {"json": json.dumps(facts, indent=2, allow_nan=False) + "\n", "md": md(facts), "html": page(facts)}
    return {kind: atomic_write_text(rd.report_path(kind), text) for kind, text in texts.items()}


def write_reports(run_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``run_dir``; returns their paths."""
    rd = RunDir(run_dir)
    return _write(rd, build_report(rd.root), render_markdown, render_html)


def write_folder_reports(folder: Path) -> list[dict[str, Path]]:
    """Each run's report in ``folder``, then the folder's comparison (last): the paths, in that order."""
    runs = runs_in(folder)
    if not runs:
        rd = RunDir(folder)
        raise FedllmError(
            f"{folder}: neither {rd.ledger_path.name} nor {rd.metrics_path.name} here, nor a sub-folder"
            " holding a run; not a fedllm run directory"
        )
    written = [write_reports(r.root) for r in runs]
    comparison = build_comparison(folder)
    return [*written, _write(RunDir(folder), comparison, render_comparison_markdown, render_comparison_html)]


def write_any(path: Path) -> list[dict[str, Path]]:
    """``fedllm report PATH``: a run's report, or the reports of a folder of runs and their comparison."""
    if RunDir(path).has_run() or not Path(path).is_dir():
        return [write_reports(path)]
    return write_folder_reports(path)
