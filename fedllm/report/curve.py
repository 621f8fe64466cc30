"""Accuracy against epsilon over several runs of one scenario: what each epsilon buys.

A consortium picks its budget by looking at what each epsilon buys, and one run answers for one epsilon.
A run's point is read from its ``metrics.json`` (what ``fedllm compare`` has always printed): its final
central accuracy (the last round that has one) against the **largest** final client epsilon (the client
that spent most; the smallest is kept beside it). A non-private run has no epsilon (infinity, ``null`` in
JSON): it is not a point of the curve but its accuracy is marked separately, as the dashed "no DP" line.

Three users: ``fedllm compare RUN...`` (runs named on the command line; different scenarios refused), a
run's own report (the other runs of its scenario in the same parent folder, :func:`sibling_curve`), and
``fedllm report FOLDER`` on a folder of runs (every run in it, one line per scenario, :func:`folder_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError
from fedllm.run.rundir import RunDir

COMPARISON_SCHEMA = "fedllm-comparison"
COMPARISON_VERSION = 1


@dataclass(frozen=True)
class RunPoint:
    run: str
    scenario: str
    dp: bool
    epsilon_max: float  # inf for a non-private run
    epsilon_min: float
    accuracy: float | None
    rounds: int


def read_point(run_dir: Path) -> RunPoint:
    rd = RunDir(run_dir)
    if not rd.metrics_path.is_file():
        raise ConfigError(f"{run_dir}: no {rd.metrics_path.name} (not a fedllm run directory)")
    m = rd.read_metrics()
    finals = [c.epsilon for c in m.final_clients().values() if c.epsilon is not None]
    eps_max = max(finals) if (m.dp and finals) else math.inf
    eps_min = min(finals) if (m.dp and finals) else math.inf
    accuracy = next((r.accuracy for r in reversed(m.rounds) if r.accuracy is not None), None)
    return RunPoint(str(run_dir), m.scenario, m.dp, eps_max, eps_min, accuracy, len(m.rounds))


def compare(run_dirs: Sequence[Path]) -> list[RunPoint]:
    """The runs sorted by epsilon; all must be runs of one scenario (different scenarios do not compare)."""
    points = [read_point(Path(d)) for d in run_dirs]
    scenarios = sorted({p.scenario for p in points})
    if len(scenarios) > 1:
        raise ConfigError(f"compare: the runs are of different scenarios ({', '.join(scenarios)})")
    return sorted(points, key=lambda p: p.epsilon_max)


def point_facts(p: RunPoint) -> dict[str, Any]:
    """A point as JSON-safe data (``fedllm compare --json``, ``report.json``): infinite epsilon is ``null``."""
    return {
        **asdict(p),
        "epsilon_max": None if math.isinf(p.epsilon_max) else p.epsilon_max,
        "epsilon_min": None if math.isinf(p.epsilon_min) else p.epsilon_min,
    }


# ---------------------------------------------------------------------------------------------- folders


def runs_in(folder: Path) -> list[RunDir]:
    """The run directories directly inside ``folder`` (a ledger or metrics there), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [RunDir(d) for d in sorted(folder.iterdir()) if d.is_dir() and RunDir(d).has_run()]


def folder_curve(folder: Path, scenario: str | None = None) -> dict[str, Any]:
    """Every run in ``folder`` (of ``scenario`` only, when given) as points named by their sub-folder,
    sorted by scenario then epsilon (non-private last); runs without readable metrics are listed as skipped."""
    points: list[RunPoint] = []
    skipped: list[dict[str, str]] = []
    for rd in runs_in(folder):
        try:
            p = read_point(rd.root)
        except (ConfigError, ValueError, KeyError, TypeError, OSError) as exc:
            skipped.append({"run": rd.root.name, "reason": str(exc) or type(exc).__name__})
            continue
        if scenario is None or p.scenario == scenario:
            points.append(replace(p, run=rd.root.name))
    points.sort(key=lambda p: (p.scenario, p.epsilon_max, p.run))
    return {"dir": str(folder), "runs": [point_facts(p) for p in points], "skipped": skipped}


def sibling_curve(run_dir: Path) -> dict[str, Any] | None:
    """The curve a run's own report shows: the runs of its scenario in its parent folder, itself included
    (``this_run``), when there is at least one other; None otherwise (or when it has no readable metrics)."""
    root = Path(run_dir).resolve()
    try:
        scenario = read_point(root).scenario
    except (ConfigError, ValueError, KeyError, TypeError, OSError):
        return None
    curve = folder_curve(root.parent, scenario)
    names = [p["run"] for p in curve["runs"]]
    if root.name not in names or len(names) < 2:
        return None
    return {**curve, "this_run": root.name, "skipped": []}


# ---------------------------------------------------------------------------------------------- reading


def dp_pairs(points: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(largest client epsilon, accuracy) of the private runs that can be drawn (finite epsilon > 0)."""
    return sorted(
        (p["epsilon_max"], p["accuracy"])
        for p in points
        if p["dp"] and p["accuracy"] is not None and p["epsilon_max"] is not None and 0 < p["epsilon_max"]
    )


def non_private_accuracy(points: Sequence[dict[str, Any]]) -> float | None:
    """The best accuracy of the non-private runs (the dashed "no DP" line), None without one."""
    plain = [p["accuracy"] for p in points if not p["dp"] and p["accuracy"] is not None]
    return max(plain) if plain else None


def _fmt_eps(e: float | None) -> str:
    return "inf (no DP)" if e is None or math.isinf(e) else f"{e:.2f}"


def table(points: Sequence[dict[str, Any]], *, with_scenario: bool = False) -> list[list[str]]:
    """The curve's table, header first (terminal, Markdown and HTML print the same cells)."""
    head = ["run", "max client eps", "min client eps", "rounds", "final accuracy"]
    rows = [
        [
            p["run"],
            _fmt_eps(p["epsilon_max"]),
            _fmt_eps(p["epsilon_min"]),
            str(p["rounds"]),
            "-" if p["accuracy"] is None else f"{100 * p['accuracy']:.1f} %",
        ]
        for p in points
    ]
    if with_scenario:
        return [["scenario", *head], *[[p["scenario"], *r] for p, r in zip(points, rows, strict=True)]]
    return [head, *rows]


def render_table(points: Sequence[RunPoint]) -> str:
    rows = table([point_facts(p) for p in points])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def build_comparison(folder: Path) -> dict[str, Any]:
    """The facts of a folder's comparison (its ``report.json``): every run in it as a point of the curve."""
    return {
        "schema": COMPARISON_SCHEMA,
        "version": COMPARISON_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **folder_curve(folder),
    }
