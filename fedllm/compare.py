"""``fedllm compare RUN...``: accuracy against epsilon over several runs of the same scenario.

A consortium picks its budget by looking at what each epsilon buys. One run answers for one epsilon, so
this reads the run directories (``metrics.json`` and ``config.toml`` each), checks they are the same
scenario, and prints a table (final central accuracy, the largest and smallest final client epsilon; a
non-private run has epsilon infinity), with ``--svg``/``--json`` to write the curve.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError


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
    from fedllm import metrics as run_metrics

    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.json (not a fedllm run directory)")
    m = run_metrics.read(path)
    finals = [c.epsilon for c in m.final_clients().values() if c.epsilon is not None]
    eps_max = max(finals) if (m.dp and finals) else math.inf
    eps_min = min(finals) if (m.dp and finals) else math.inf
    accuracy = next((r.accuracy for r in reversed(m.rounds) if r.accuracy is not None), None)
    return RunPoint(str(run_dir), m.scenario, m.dp, eps_max, eps_min, accuracy, len(m.rounds))


def _fmt_eps(e: float) -> str:
    return "inf (no DP)" if math.isinf(e) else f"{e:.2f}"


def render_table(points: Sequence[RunPoint]) -> str:
    rows = [["run", "max client eps", "min client eps", "rounds", "final accuracy"]]
    for p in points:
        acc = "-" if p.accuracy is None else f"{100 * p.accuracy:.1f} %"
        rows.append([p.run, _fmt_eps(p.epsilon_max), _fmt_eps(p.epsilon_min), str(p.rounds), acc])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def svg_curve(series: Mapping[str, tuple[Sequence[tuple[float, float]], float | None]], title: str = "") -> str:
    """A hand-written SVG (no plotting dependency): accuracy against epsilon (log axis), one line per
    series, its non-private accuracy as a dashed line of the same colour."""
    w, h, left, right, top, bottom = 480, 300, 50, 20, 30, 45
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    eps = [e for pts, _ in series.values() for e, _ in pts if e > 0 and math.isfinite(e)] or [1.0]
    lo, hi = math.log(min(eps)), math.log(max(eps))
    hi = hi if hi > lo else lo + 1.0

    def x_of(e: float) -> float:
        return left + (math.log(e) - lo) / (hi - lo) * (w - left - right)

    def y_of(a: float) -> float:
        return top + (1.0 - a) * (h - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(tick)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{int(tick * 100)}%</text>')
    for e in sorted(set(eps)):
        parts.append(f'<text x="{x_of(e):.1f}" y="{h - bottom + 15}" text-anchor="middle">{e:g}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 10}" text-anchor="middle">epsilon (log scale)</text>')
    for k, (name, (pts, non_private)) in enumerate(series.items()):
        color = colors[k % len(colors)]
        finite = sorted((e, a) for e, a in pts if e > 0 and math.isfinite(e))
        if finite:
            coords = " ".join(f"{x_of(e):.1f},{y_of(a):.1f}" for e, a in finite)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
            parts += [f'<circle cx="{x_of(e):.1f}" cy="{y_of(a):.1f}" r="3" fill="{color}"/>' for e, a in finite]
        if non_private is not None:
            y = y_of(non_private)
            parts.append(
                f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}"'
                ' stroke-dasharray="4 3"/>'
            )
        parts.append(f'<text x="{left + 8}" y="{top + 12 + 14 * k}" fill="{color}">{name} (dashed: no DP)</text>')
    if title:
        parts.append(f'<text x="{w / 2}" y="{top - 12}" text-anchor="middle">{title}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def compare(run_dirs: Sequence[Path]) -> list[RunPoint]:
    """The runs sorted by epsilon; all must be runs of one scenario (different scenarios do not compare)."""
    points = [read_point(Path(d)) for d in run_dirs]
    scenarios = sorted({p.scenario for p in points})
    if len(scenarios) > 1:
        raise ConfigError(f"compare: the runs are of different scenarios ({', '.join(scenarios)})")
    return sorted(points, key=lambda p: p.epsilon_max)


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compare", help="accuracy vs epsilon over several runs of one scenario")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--svg", type=Path, help="write the accuracy-vs-epsilon curve here")
    parser.add_argument("--json", type=Path, help="write the points here")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    points = compare(args.runs)
    print(render_table(points))
    if args.svg:
        dp = [(p.epsilon_max, p.accuracy) for p in points if p.dp and p.accuracy is not None]
        plain = [p.accuracy for p in points if not p.dp and p.accuracy is not None]
        name = points[0].scenario
        args.svg.write_text(
            svg_curve({name: (dp, max(plain) if plain else None)}, title=f"{name}: accuracy vs epsilon")
        )
        print(args.svg)
    if args.json:
        payload = [
            {
                **p.__dict__,
                "epsilon_max": None if math.isinf(p.epsilon_max) else p.epsilon_max,
                "epsilon_min": None if math.isinf(p.epsilon_min) else p.epsilon_min,
            }
            for p in points
        ]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(args.json)
    return 0
