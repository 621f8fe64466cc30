"""The report's charts as inline SVG, drawn here in Python: one line-chart function for all of them.

No plotting dependency and no external URL: the HTML report is opened on machines with no network, so
its SVG carries no ``xmlns`` (inline SVG needs none) and is styled by the page's CSS (``CHART_CSS``). A chart
written to a file of its own (``fedllm compare --svg``) is ``standalone``: it then carries the namespace a
standalone SVG file needs and its own copy of the same style.

Charts: epsilon per client per round, central accuracy per round, and accuracy against epsilon over
several runs (``curve_chart``, one line per scenario, its non-private accuracy dashed).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedllm.report.curve import dp_pairs, non_private_accuracy

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # only for a standalone .svg file, never inside the HTML report

CHART_CSS = """
.plot { fill: #fff; stroke: #999; } .grid { stroke: #eee; }
.tick { font-size: 11px; fill: #555; } .axis { font-size: 12px; fill: #333; } .legend { font-size: 12px; }
.chart-title { font-size: 14px; font-weight: 600; } .message { font-size: 14px; fill: #a50e0e; }
"""


@dataclass(frozen=True)
class Series:
    """One line: ``points`` (x, y) with y None where unknown; ``limit`` a dashed horizontal line of its colour."""

    name: str
    points: Sequence[tuple[float, float | None]]
    color: str
    limit: float | None = None
    css_class: str = "series"


def nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5, 5 x 10^k)."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exp
        if candidate >= value:
            return float(candidate)
    return float(10 ** (exp + 1))


def fmt_tick(v: float) -> str:
    """Whole numbers as such (rounds), others to 3 significant digits (an epsilon of 0.453676 reads 0.454)."""
    if v != 0 and abs(v) < 0.01:
        return f"{v:.1e}"
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"


def line_chart(
    *,
    title: str,
    series: Sequence[Series],
    x_values: Sequence[float],
    x_label: str = "round",
    y_label: str,
    y_max: float | None = None,
    x_log: bool = False,
    x_ticks: Sequence[float] | None = None,
    limit_label: str = "budget",
    message: str = "",
    standalone: bool = False,
) -> str:
    """A line chart: one ``<g class="{css_class}">`` per series (polyline and a circle per known point), a
    dashed ``line.budget`` per ``limit``, and a legend. ``x_values`` set the x range (with the points');
    ``x_ticks`` default to at most 12 of them. ``x_log`` puts x on a log scale (every x must be > 0)."""
    width, height, left, right, top, bottom = 760, 340, 60, 170, 34, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [y for s in series for _, y in s.points if y is not None]
    limits = [s.limit for s in series if s.limit is not None]
    y_top = y_max if y_max is not None else nice_max(max([*values, *limits, 0.0]) * 1.05)
    xs = list(x_values) or [x for s in series for x, _ in s.points] or [1]
    scale = math.log if x_log else float
    all_x = [scale(x) for x in [*xs, *(x for s in series for x, _ in s.points)]]
    x_lo, x_hi = min(all_x), max(all_x)

    def px(x: float) -> float:
        return left + (plot_w * (scale(x) - x_lo) / (x_hi - x_lo) if x_hi > x_lo else plot_w / 2)

    def py(y: float) -> float:
        return top + plot_h * (1 - y / y_top)

    e = html.escape
    ns = f' xmlns="{SVG_NAMESPACE}"' if standalone else ""
    parts = [
        f'<svg{ns} role="img" aria-label="{e(title)}" viewBox="0 0 {width} {height}" width="{width}"'
        f' height="{height}">',
    ]
    if standalone:
        parts.append(f"<style>svg {{ font-family: sans-serif; }}{CHART_CSS}</style>")
    parts += [
        f'<text x="{left}" y="20" class="chart-title">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>',
    ]
    for i in range(6):
        y = y_top * i / 5
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" class="tick" text-anchor="end">{fmt_tick(y)}</text>')
    if x_ticks is None:
        x_ticks = xs[:: max(1, math.ceil(len(xs) / 12))]
    for x in x_ticks:
        parts.append(
            f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{fmt_tick(x)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" class="axis" text-anchor="middle">{e(x_label)}</text>'
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2}" class="axis" text-anchor="middle"'
        f' transform="rotate(-90 14 {top + plot_h / 2})">{e(y_label)}</text>'
    )
    if message:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="message" text-anchor="middle">'
            f"{e(message)}</text>"
        )
    for i, s in enumerate(series):
        points = [(px(x), py(y)) for x, y in s.points if y is not None]
        parts.append(f'<g class="{s.css_class}" data-name="{e(s.name)}">')
        if len(points) > 1:
            pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{s.color}" stroke-width="2"/>')
        for x, y in points:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{s.color}"/>')
        if s.limit is not None:
            y = py(s.limit)
            parts.append(
                f'<line class="budget" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"'
                f' stroke="{s.color}" stroke-dasharray="6 4" stroke-width="1.5"/>'
            )
        ly = top + 8 + 18 * i
        parts.append(
            f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly}" y2="{ly}"'
            f' stroke="{s.color}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{width - right + 38}" y="{ly + 4}" class="legend">{e(s.name)}</text>')
        parts.append("</g>")
    if limits:
        ly = top + 8 + 18 * len(series)
        parts.append(
            f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly}" y2="{ly}" stroke="#444"'
            ' stroke-dasharray="6 4"/>'
        )
        parts.append(f'<text x="{width - right + 38}" y="{ly + 4}" class="legend">{e(limit_label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- the charts


def epsilon_chart(report: dict[str, Any]) -> str:
    xs = [r["round"] for r in report["rounds"]]
    if not report["run"]["dp"]:
        return line_chart(
            title="Epsilon per client",
            x_values=xs,
            series=[],
            y_label="epsilon",
            message="non-private run: epsilon is infinite (no DP)",
        )
    series = [
        Series(
            c["id"], list(zip(xs, c["epsilon_per_round"], strict=False)), PALETTE[i % len(PALETTE)], c["budget_epsilon"]
        )
        for i, c in enumerate(report["clients"])
    ]
    return line_chart(
        title="Epsilon per client (dashed: budget)",
        x_values=xs,
        series=series,
        y_label="epsilon",
        message="" if xs else "no rounds recorded",
    )


def accuracy_chart(report: dict[str, Any]) -> str:
    xs = [r["round"] for r in report["rounds"]]
    values = [r["accuracy"] for r in report["rounds"]]
    initial = report["initial"]["accuracy"]
    if initial is not None:
        xs, values = [0, *xs], [initial, *values]
    has = any(v is not None for v in values)
    return line_chart(
        title="Global accuracy (central test set)",
        x_values=xs,
        series=[Series("global accuracy", list(zip(xs, values, strict=True)), PALETTE[0], css_class="accuracy")],
        y_label="accuracy",
        y_max=1.0,
        message="" if has else "no central evaluation recorded",
    )


def accuracy_epsilon_chart(
    series: Mapping[str, tuple[Sequence[tuple[float, float]], float | None]],
    *,
    title: str = "Accuracy vs epsilon",
    standalone: bool = False,
) -> str:
    """Accuracy against epsilon (log axis): per name, its (epsilon, accuracy) points as one ``g.curve`` line
    and its non-private accuracy (or None) as a dashed line of the same colour. Points with an epsilon that
    cannot sit on a log axis (not finite, not > 0) are left out."""
    lines = [
        Series(
            name,
            sorted((x, y) for x, y in pts if 0 < x < math.inf),
            PALETTE[i % len(PALETTE)],
            limit=non_private,
            css_class="curve",
        )
        for i, (name, (pts, non_private)) in enumerate(series.items())
    ]
    eps = sorted({x for s in lines for x, _ in s.points})
    return line_chart(
        title=title + (" (dashed: no DP)" if any(s.limit is not None for s in lines) else ""),
        x_values=eps or [1.0],
        x_ticks=eps,
        x_log=True,
        x_label="epsilon (log scale)",
        series=lines,
        y_label="accuracy",
        y_max=1.0,
        limit_label="no DP",
        message="" if eps else "no private run with an accuracy",
        standalone=standalone,
    )


def curve_chart(points: Sequence[dict[str, Any]], *, standalone: bool = False) -> str:
    """The runs' curve from ``fedllm.report.curve.point_facts`` dicts: one line per scenario through its
    private runs (final central accuracy against the largest client epsilon), its best non-private run dashed."""
    scenarios = list(dict.fromkeys(p["scenario"] for p in points))
    by_name = {name: [p for p in points if p["scenario"] == name] for name in scenarios}
    series = {name: (dp_pairs(runs), non_private_accuracy(runs)) for name, runs in by_name.items()}
    title = f"{scenarios[0]}: accuracy vs epsilon" if len(scenarios) == 1 else "Accuracy vs epsilon"
    return accuracy_epsilon_chart(series, title=title, standalone=standalone)
