"""``fedllm report DIR``: the run's privacy and accuracy facts for people who were not there.

Three files with the same facts: ``report.json`` (machine-readable, schema in ``docs/report-schema.md``),
``report.md`` (tables, for a ticket or a pull request) and ``report.html`` (charts, for a privacy officer).
Epsilons come from the coordinator's ledger, not from ``metrics.json``, because the ledger is what the
clients signed; the audit verdict is included so that nobody reads a chart of numbers that did not check out.

The HTML is self-contained on purpose: it is often opened on machines with no network, attached to
e-mails or archived, so it has no external URL at all (no CDN, no web font, no ``xmlns`` either): CSS is
inline and the charts are SVG drawn here in Python. A small inline script marks the page as rendered
(``data-rendered="ok"`` and counts on ``<body>``) so a headless-browser test can check it from the page.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedllm.audit import DEFAULT_TOLERANCE, NON_PRIVATE, AuditResult, audit, read_config, read_entries
from fedllm.config import PrivacyConfig
from fedllm.errors import FedllmError
from fedllm.ledger import LedgerEntry
from fedllm.metrics import RunMetrics
from fedllm.metrics import read as read_metrics
from fedllm.signing import fingerprint, public_path

SCHEMA = "fedllm-report"
SCHEMA_VERSION = 1
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- facts


@dataclass
class _Sources:
    cfg: dict[str, Any]
    metrics: RunMetrics | None
    coord: list[LedgerEntry]


def _load(run_dir: Path) -> _Sources:
    ledger = run_dir / "ledger.sqlite"
    if not ledger.is_file() and not (run_dir / "metrics.json").is_file():
        raise FedllmError(f"{run_dir}: neither ledger.sqlite nor metrics.json here; not a fedllm run directory")
    metrics = None
    if (run_dir / "metrics.json").is_file():
        try:
            metrics = read_metrics(run_dir / "metrics.json")
        except (ValueError, KeyError, TypeError) as exc:
            raise FedllmError(f"{run_dir / 'metrics.json'}: unreadable: {exc}") from exc
    coord = read_entries(ledger) if ledger.is_file() else []
    return _Sources(cfg=read_config(run_dir), metrics=metrics, coord=coord)


def _settings(src: _Sources, run_dir: Path, rounds_completed: int) -> dict[str, Any]:
    cfg, m = src.cfg, src.metrics
    defaults = PrivacyConfig()
    privacy = cfg.get("privacy", {}) or {}
    dp = bool(privacy.get("enabled", m.dp if m else defaults.enabled))
    model, data, training = cfg.get("model", {}) or {}, cfg.get("data", {}) or {}, cfg.get("training", {}) or {}
    listed = [c for c in cfg.get("clients", []) or [] if isinstance(c, dict) and "id" in c]
    default_eps = float(privacy.get("epsilon", defaults.epsilon))
    default_delta = float(privacy.get("delta", defaults.delta))
    budgets = {str(c["id"]): (float(c.get("epsilon", default_eps)) if dp else None) for c in listed}
    deltas = {str(c["id"]): float(c.get("delta", default_delta)) for c in listed}
    return {
        "dir": str(run_dir),
        "run_id": (m.run_id if m else None) or (src.coord[0].run_id if src.coord else None),
        "scenario": str(cfg.get("name") or (m.scenario if m else "") or ""),
        "rounds_planned": int(cfg.get("rounds") or (m.rounds_planned if m else 0)),
        "rounds_completed": rounds_completed,
        "stopped_early": m.stopped_early if m else None,
        "num_clients": int(cfg.get("num_clients") or len(listed)),
        "clients_per_round": cfg.get("clients_per_round"),
        "min_clients": cfg.get("min_clients"),
        "model": {"name": model.get("name"), "mode": model.get("mode")},
        "data": {"source": data.get("source"), "partition": data.get("partition"), "alpha": data.get("alpha")},
        "training": {
            "local_steps": training.get("local_steps"),
            "batch_size": training.get("batch_size"),
            "learning_rate": training.get("learning_rate"),
        },
        "dp": dp,
        "accountant": str(privacy.get("accountant", defaults.accountant)) if dp else None,
        "epsilon_default": default_eps if dp else None,
        "delta_default": default_delta,
        "max_grad_norm": privacy.get("max_grad_norm", defaults.max_grad_norm) if dp else None,
        "budgets": budgets,
        "deltas": deltas,
        "secure_aggregation": bool((cfg.get("secure_aggregation") or {}).get("enabled", False)),
        "tls": bool(cfg.get("tls", False)) or (m is not None and m.transport == "tls"),
        "transport": m.transport if m else None,
        "wall_seconds": m.wall_seconds if m else None,
    }


def _rounds(src: _Sources) -> list[dict[str, Any]]:
    """Every round either file knows of: a round the ledger has but metrics lacks (a crash) still shows."""
    records = {r.round: r for r in (src.metrics.rounds if src.metrics else [])}
    numbers = sorted(set(records) | {e.round for e in src.coord if e.round > 0})
    out = []
    for n in numbers:
        r = records.get(n)
        out.append(
            {
                "round": n,
                "accuracy": _finite(r.accuracy) if r else None,
                "loss": _finite(r.loss) if r else None,
                "aggregated": r.aggregated if r else None,
                "federated_accuracy": _finite(r.federated_accuracy) if r else None,
            }
        )
    return out


def _clients(src: _Sources, settings: dict[str, Any], rounds: list[int], run_dir: Path) -> list[dict[str, Any]]:
    dp = settings["dp"]
    ids = list(settings["budgets"])
    ids += [cid for cid in dict.fromkeys(e.client_id for e in src.coord) if cid not in ids]
    metric_status = {
        (cid, r.round): c.status for r in (src.metrics.rounds if src.metrics else []) for cid, c in r.clients.items()
    }
    out = []
    for cid in ids:
        rows = [e for e in src.coord if e.client_id == cid]
        by_round = {e.round: e for e in rows}
        private = dp and not any(e.accountant == NON_PRIVATE for e in rows)
        eps_series: list[float | None] = []
        status_series: list[str | None] = []
        current: float | None = 0.0 if private else None
        for n in rounds:
            e = by_round.get(n)
            if e is not None and e.status == "trained" and private:
                current = _finite(e.epsilon)
            eps_series.append(current)
            status_series.append(metric_status.get((cid, n)) or (e.status if e is not None else None))
        trained = [e for e in rows if e.status == "trained"]
        budget = _finite(rows[-1].budget_epsilon) if rows and private else settings["budgets"].get(cid)
        delta = rows[-1].delta if rows else settings["deltas"].get(cid, settings["delta_default"])
        key = public_path(run_dir / "clients" / cid / "node_key")
        out.append(
            {
                "id": cid,
                "budget_epsilon": budget if private else None,
                "delta": delta,
                "final_epsilon": (_finite(trained[-1].epsilon) if trained else 0.0) if private else None,
                "rounds_trained": len(trained),
                "epsilon_per_round": eps_series,
                "status_per_round": status_series,
                "key_fingerprint": fingerprint(key.read_text()) if key.is_file() else None,
            }
        )
    return out


def _audit_summary(run_dir: Path) -> tuple[dict[str, Any], AuditResult | None]:
    try:
        result = audit(run_dir, DEFAULT_TOLERANCE)
    except FedllmError as exc:
        summary = {"ok": None, "status": None, "verdict": f"not audited: {exc}", "tolerance": DEFAULT_TOLERANCE}
        return {**summary, "findings": [], "notes": [], "unverified": [], "gaps": [], "clients": []}, None
    data = result.to_dict()
    keep = (
        *("ok", "status", "verdict", "tolerance", "same_accountant_rtol"),
        *("findings", "notes", "unverified", "gaps", "clients"),
    )
    return {k: data[k] for k in keep}, result


def build_report(run_dir: Path) -> dict[str, Any]:
    """The facts of ``report.json`` (see ``docs/report-schema.md``); JSON-safe: no infinities, no NaN."""
    run_dir = Path(run_dir)
    src = _load(run_dir)
    rounds = _rounds(src)
    completed = len(src.metrics.rounds) if src.metrics else len(rounds)
    settings = _settings(src, run_dir, completed)
    m = src.metrics
    audit_summary, _ = _audit_summary(run_dir)
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": settings,
        "initial": {
            "accuracy": _finite(m.initial_accuracy) if m else None,
            "loss": _finite(m.initial_loss) if m else None,
        },
        "rounds": rounds,
        "clients": _clients(src, settings, [r["round"] for r in rounds], run_dir),
        "audit": audit_summary,
        "empirical_audit": _empirical(run_dir),
    }


def _empirical(run_dir: Path) -> list[dict[str, Any]]:
    """Per audited client: the reported (theoretical) epsilon beside the one-run empirical lower bound."""
    from fedllm.empirical import load_result

    result = load_result(run_dir)
    if result is None:
        return []
    keep = ("client", "adversary", "canaries", "guesses", "guesses_in", "guesses_out", "correct", "confidence")
    data = result.to_dict()
    return [
        {
            **{k: data[k] for k in keep},
            "delta": result.delta,
            "theoretical_epsilon": _finite(result.theoretical_epsilon),
            "lower_bound": result.lower_bound,
            "violation": result.violation,
            "dp": result.dp,
            "reference_epsilon": _finite(result.reference_epsilon),
            "audited_run": result.run_dir,
        }
    ]


_EMPIRICAL_HEAD = ["client", "theoretical ε", "empirical lower bound", "canaries m", "guesses", "correct", "adversary"]
_EMPIRICAL_NOTE = (
    "One-run audit (Steinke, Nasr, Jagielski 2023): canaries hidden in the client's data by secret coins, guessed"
    " from the final model. The lower bound holds at the stated confidence for this adversary and these canaries"
    " only; it cannot prove privacy, a gap below the theoretical ε is expected, and a bound above it means the"
    " mechanism leaks more than it reports (docs/privacy.md)."
)


def _empirical_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            a["client"],
            _eps_cell(a["theoretical_epsilon"], a["dp"]),
            f"{a['lower_bound']:.4f} ({a['confidence']:.0%})" + (" VIOLATION" if a["violation"] else ""),
            str(a["canaries"]),
            f"{a['guesses']} ({a['guesses_in']} in, {a['guesses_out']} out)",
            str(a["correct"]),
            a["adversary"],
        ]
        for a in report.get("empirical_audit") or []
    ]


# ---------------------------------------------------------------------------------------------- charts


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5, 5 x 10^k)."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exp
        if candidate >= value:
            return float(candidate)
    return float(10 ** (exp + 1))


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def _svg_chart(
    *,
    title: str,
    x_values: list[int],
    series: list[dict[str, Any]],
    y_label: str,
    y_max: float | None = None,
    message: str = "",
) -> str:
    """A line chart as inline SVG: one ``<g class="series">`` per series, dashed ``line.budget`` per limit.

    ``series`` items: ``{"name", "values": [float|None], "color", "limit": float|None, "class"}``.
    """
    width, height, left, right, top, bottom = 760, 340, 60, 170, 34, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series for v in s["values"] if v is not None]
    limits = [s["limit"] for s in series if s.get("limit") is not None]
    y_top = y_max if y_max is not None else _nice_max(max([*values, *limits, 0.0]) * 1.05)
    xs = x_values or [1]
    x_lo, x_hi = min(xs), max(xs)

    def px(x: float) -> float:
        return left + (plot_w * (x - x_lo) / (x_hi - x_lo) if x_hi > x_lo else plot_w / 2)

    def py(y: float) -> float:
        return top + plot_h * (1 - y / y_top)

    e = html.escape
    parts = [
        f'<svg role="img" aria-label="{e(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
        f'<text x="{left}" y="20" class="chart-title">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>',
    ]
    for i in range(6):
        y = y_top * i / 5
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" class="tick" text-anchor="end">{_fmt_tick(y)}</text>')
    step = max(1, math.ceil(len(xs) / 12))
    for x in xs[::step]:
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" class="axis" text-anchor="middle">round</text>')
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
        color = s["color"]
        points = [(px(x), py(v)) for x, v in zip(xs, s["values"], strict=False) if v is not None]
        cls = s.get("class", "series")
        parts.append(f'<g class="{cls}" data-name="{e(s["name"])}">')
        if len(points) > 1:
            pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in points:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        if s.get("limit") is not None:
            y = py(s["limit"])
            parts.append(
                f'<line class="budget" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"'
                f' stroke="{color}" stroke-dasharray="6 4" stroke-width="1.5"/>'
            )
        ly = top + 8 + 18 * i
        parts.append(
            f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly}" y2="{ly}"'
            f' stroke="{color}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{width - right + 38}" y="{ly + 4}" class="legend">{e(s["name"])}</text>')
        parts.append("</g>")
    if limits:
        ly = top + 8 + 18 * len(series)
        parts.append(
            f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly}" y2="{ly}" stroke="#444"'
            ' stroke-dasharray="6 4"/>'
        )
        parts.append(f'<text x="{width - right + 38}" y="{ly + 4}" class="legend">budget</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def epsilon_chart(report: dict[str, Any]) -> str:
    xs = [r["round"] for r in report["rounds"]]
    if not report["run"]["dp"]:
        return _svg_chart(
            title="Epsilon per client",
            x_values=xs,
            series=[],
            y_label="epsilon",
            message="non-private run: epsilon is infinite (no DP)",
        )
    series = [
        {
            "name": c["id"],
            "values": c["epsilon_per_round"],
            "color": PALETTE[i % len(PALETTE)],
            "limit": c["budget_epsilon"],
        }
        for i, c in enumerate(report["clients"])
    ]
    return _svg_chart(
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
    series = [{"name": "global accuracy", "values": values, "color": PALETTE[0], "limit": None, "class": "accuracy"}]
    return _svg_chart(
        title="Global accuracy (central test set)",
        x_values=xs,
        series=series,
        y_label="accuracy",
        y_max=1.0,
        message="" if has else "no central evaluation recorded",
    )


# ---------------------------------------------------------------------------------------------- html


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 2rem; color: #222;
       max-width: 1100px; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.verdict { padding: 0.6rem 1rem; border-radius: 4px; font-weight: 600; }
.verdict.ok { background: #e6f4ea; color: #1e6b34; } .verdict.bad { background: #fce8e6; color: #a50e0e; }
.verdict.na { background: #f1f3f4; color: #444; } .verdict.unverified { background: #fef7e0; color: #7a4f01; }
.warn { color: #a50e0e; } .muted { color: #666; }
svg { font-family: inherit; } .plot { fill: #fff; stroke: #999; } .grid { stroke: #eee; }
.tick { font-size: 11px; fill: #555; } .axis { font-size: 12px; fill: #333; } .legend { font-size: 12px; }
.chart-title { font-size: 14px; font-weight: 600; } .message { font-size: 14px; fill: #a50e0e; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var missing = [];
  var eps = document.querySelector("#epsilon-chart svg");
  var acc = document.querySelector("#accuracy-chart svg");
  var table = document.querySelector("#clients-table");
  if (!eps) { missing.push("epsilon-chart"); }
  if (!acc) { missing.push("accuracy-chart"); }
  if (!table) { missing.push("clients-table"); }
  document.body.dataset.series = String(eps ? eps.querySelectorAll("g.series").length : 0);
  document.body.dataset.rows = String(table ? table.querySelectorAll("tbody tr").length : 0);
  document.body.dataset.rendered = missing.length ? "missing: " + missing.join(", ") : "ok";
});
"""


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:g}"
    return str(value)


def _eps_cell(value: float | None, dp: bool) -> str:
    return "∞ (non-private)" if not dp else _cell(value)


def _settings_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    run = report["run"]
    stopped = run["stopped_early"]
    return [
        ("scenario", run["scenario"]),
        ("run id", _cell(run["run_id"])),
        ("rounds", f"{run['rounds_completed']} completed of {run['rounds_planned']} planned"),
        ("stopped early", stopped or "no"),
        ("clients", f"{run['num_clients']} (per round: {run['clients_per_round'] or 'all'})"),
        ("model", f"{_cell(run['model']['name'])} ({_cell(run['model']['mode'])})"),
        ("data", f"{_cell(run['data']['source'])}, partition {_cell(run['data']['partition'])}"),
        ("differential privacy", "on" if run["dp"] else "OFF (non-private baseline: epsilon = ∞)"),
        ("accountant", _cell(run["accountant"])),
        ("delta (default)", f"{run['delta_default']:g}"),
        ("secure aggregation", "on" if run["secure_aggregation"] else "not used"),
        ("TLS", "on" if run["tls"] else "not used"),
    ]


def render_html(report: dict[str, Any]) -> str:
    """The self-contained page; every string from the run (ids, names, findings) goes through html.escape."""
    e = html.escape
    run, dp = report["run"], report["run"]["dp"]
    audit_ = report["audit"]
    # "unverified" (a client's own ledger or key missing) is neither clean nor proof of tampering: its own colour.
    verdict_cls = "na" if audit_["ok"] is None else ("ok" if audit_["ok"] else "bad")
    verdict_cls = "unverified" if audit_.get("status") == "unverified" else verdict_cls
    rounds = [r["round"] for r in report["rounds"]]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fedllm report: {e(run['scenario'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Federated run report: {e(run['scenario'])}</h1>",
        f'<p class="muted">Run directory {e(run["dir"])}; generated {e(report["generated_at"])}.</p>',
        f'<p id="verdict" class="verdict {verdict_cls}">Audit: {e(audit_["verdict"])}</p>',
    ]
    if run["stopped_early"]:
        out.append(f'<p class="warn">The run stopped early: {e(run["stopped_early"])}</p>')
    if not dp:
        out.append('<p class="warn">Non-private baseline: no differential privacy; epsilon is infinite.</p>')
    out += ["<h2>Privacy spend</h2>", f'<div id="epsilon-chart">{epsilon_chart(report)}</div>']
    out += ["<h2>Accuracy</h2>", f'<div id="accuracy-chart">{accuracy_chart(report)}</div>']

    out.append("<h2>Clients</h2>")
    head = ["client", "budget ε", "delta", "final ε", "rounds trained", "status per round", "key"]
    out.append('<table id="clients-table"><thead><tr>')
    out += [f'<th class="{"l" if h in ("client", "status per round", "key") else ""}">{e(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for c in report["clients"]:
        statuses = ", ".join(f"{n}: {s or '-'}" for n, s in zip(rounds, c["status_per_round"], strict=False))
        out.append(
            "<tr>"
            f'<td class="l">{e(c["id"])}</td><td>{_eps_cell(c["budget_epsilon"], dp)}</td>'
            f"<td>{c['delta']:g}</td><td>{_eps_cell(c['final_epsilon'], dp)}</td><td>{c['rounds_trained']}</td>"
            f'<td class="l">{e(statuses)}</td><td class="l">{e(c["key_fingerprint"] or "-")}</td></tr>'
        )
    out.append("</tbody></table>")

    if dp and rounds:
        out.append('<h3>Epsilon per round</h3><table id="epsilon-table"><thead><tr><th class="l">client</th>')
        out += [f"<th>{n}</th>" for n in rounds]
        out.append("</tr></thead><tbody>")
        for c in report["clients"]:
            cells = "".join(f"<td>{_cell(v)}</td>" for v in c["epsilon_per_round"])
            out.append(f'<tr><td class="l">{e(c["id"])}</td>{cells}</tr>')
        out.append("</tbody></table>")

    out.append('<h3>Rounds</h3><table id="rounds-table"><thead><tr>')
    out += ["<th>round</th><th>accuracy</th><th>loss</th><th>updates aggregated</th></tr></thead><tbody>"]
    for r in report["rounds"]:
        out.append(
            f"<tr><td>{r['round']}</td><td>{_cell(r['accuracy'])}</td><td>{_cell(r['loss'])}</td>"
            f"<td>{_cell(r['aggregated'])}</td></tr>"
        )
    out.append("</tbody></table>")

    out.append('<h2>Settings</h2><table id="settings-table"><tbody>')
    out += [f'<tr><th class="l">{e(k)}</th><td class="l">{e(v)}</td></tr>' for k, v in _settings_rows(report)]
    out.append("</tbody></table>")

    out.append("<h2>Audit</h2>")
    out.append(
        f"<p>Epsilon recomputed from the ledger's mechanisms with the run's accountant (must agree within"
        f" {audit_.get('same_accountant_rtol', 1e-6):g} relative) and independently with Google dp-accounting's"
        f" PLD accountant (within {audit_['tolerance']:.0%} relative). Hash chains, client signatures, budgets"
        " and the clients' own ledgers are checked too; see docs/audit.md.</p>"
    )
    if audit_["clients"]:
        out.append('<table id="audit-table"><thead><tr><th class="l">client</th><th>reported ε</th>')
        out.append("<th>recomputed ε</th><th>dp-accounting ε</th><th>budget</th><th>ok</th></tr></thead><tbody>")
        for c in audit_["clients"]:
            out.append(
                f'<tr><td class="l">{e(c["client"])}</td><td>{_eps_cell(c["reported_epsilon"], c["private"])}</td>'
                f"<td>{_cell(c['recomputed_epsilon'])}</td><td>{_cell(c['dp_accounting_epsilon'])}</td>"
                f"<td>{_eps_cell(c['budget'], c['private'])}</td><td>{_cell(c['ok'])}</td></tr>"
            )
        out.append("</tbody></table>")
    if audit_["findings"]:
        out.append('<ul id="findings" class="warn">')
        out += [f"<li>{e(f)}</li>" for f in audit_["findings"]]
        out.append("</ul>")
    if audit_.get("gaps"):
        out.append('<ul id="unverified" class="warn">')
        out += [f"<li>unverified: {e(g)}</li>" for g in audit_["gaps"]]
        out.append("</ul>")
    if audit_["notes"]:
        out.append('<ul id="notes" class="muted">')
        out += [f"<li>{e(n)}</li>" for n in audit_["notes"]]
        out.append("</ul>")
    if report.get("empirical_audit"):
        out.append(f'<h2>Empirical privacy audit</h2><p class="muted">{e(_EMPIRICAL_NOTE)}</p>')
        out.append('<table id="empirical-table"><thead><tr>')
        out += [f'<th class="{"l" if h in ("client", "adversary") else ""}">{e(h)}</th>' for h in _EMPIRICAL_HEAD]
        out.append("</tr></thead><tbody>")
        for row in _empirical_rows(report):
            cls = ' class="warn"' if row[2].endswith("VIOLATION") else ""
            cells = "".join(f'<td class="{"l" if i in (0, 6) else ""}">{e(c)}</td>' for i, c in enumerate(row))
            out.append(f"<tr{cls}>{cells}</tr>")
        out.append("</tbody></table>")
    out.append(f"<script>{_SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- markdown


def _md(value: Any) -> str:
    """A table cell: pipes would split the cell and newlines the row."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    run, dp, audit_ = report["run"], report["run"]["dp"], report["audit"]
    rounds = [r["round"] for r in report["rounds"]]
    lines = [f"# Federated run report: {_md(run['scenario'])}", "", f"**Audit:** {_md(audit_['verdict'])}", ""]
    if run["stopped_early"]:
        lines += [f"**The run stopped early:** {_md(run['stopped_early'])}", ""]
    lines += ["## Settings", "", *_md_table(["setting", "value"], [list(r) for r in _settings_rows(report)])]
    lines += ["## Clients", ""]
    lines += _md_table(
        ["client", "budget ε", "delta", "final ε", "rounds trained", "status per round", "key"],
        [
            [
                c["id"],
                _eps_cell(c["budget_epsilon"], dp),
                f"{c['delta']:g}",
                _eps_cell(c["final_epsilon"], dp),
                c["rounds_trained"],
                ", ".join(f"{n}: {s or '-'}" for n, s in zip(rounds, c["status_per_round"], strict=False)),
                c["key_fingerprint"] or "-",
            ]
            for c in report["clients"]
        ],
    )
    if dp and rounds:
        lines += ["## Epsilon per round", ""]
        lines += _md_table(
            ["client", *[str(n) for n in rounds]],
            [[c["id"], *[_cell(v) for v in c["epsilon_per_round"]]] for c in report["clients"]],
        )
    lines += ["## Rounds", ""]
    initial = report["initial"]
    rows: list[list[Any]] = []
    if initial["accuracy"] is not None:
        rows.append(["0 (initial)", _cell(initial["accuracy"]), _cell(initial["loss"]), "-"])
    rows += [[r["round"], _cell(r["accuracy"]), _cell(r["loss"]), _cell(r["aggregated"])] for r in report["rounds"]]
    lines += _md_table(["round", "accuracy", "loss", "updates aggregated"], rows)
    lines += [
        "## Audit",
        "",
        f"Epsilon recomputed with the run's accountant (within {audit_.get('same_accountant_rtol', 1e-6):g} relative)"
        f" and with Google dp-accounting PLD (within {audit_['tolerance']:.0%} relative).",
        "",
    ]
    if audit_["clients"]:
        lines += _md_table(
            ["client", "reported ε", "recomputed ε", "dp-accounting ε", "budget", "ok"],
            [
                [
                    c["client"],
                    _eps_cell(c["reported_epsilon"], c["private"]),
                    _cell(c["recomputed_epsilon"]),
                    _cell(c["dp_accounting_epsilon"]),
                    _eps_cell(c["budget"], c["private"]),
                    _cell(c["ok"]),
                ]
                for c in audit_["clients"]
            ],
        )
    lines += [f"- **finding:** {_md(f)}" for f in audit_["findings"]]
    lines += [f"- **unverified:** {_md(g)}" for g in audit_.get("gaps", [])]
    lines += [f"- note: {_md(n)}" for n in audit_["notes"]]
    if report.get("empirical_audit"):
        lines += ["", "## Empirical privacy audit", "", _EMPIRICAL_NOTE, ""]
        lines += _md_table(_EMPIRICAL_HEAD, _empirical_rows(report))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- files


def write_reports(run_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "html": run_dir / "report.html"}
    texts = {
        "json": json.dumps(report, indent=2, allow_nan=False) + "\n",
        "md": render_markdown(report),
        "html": render_html(report),
    }
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(texts[kind], encoding="utf-8")
        tmp.replace(path)
    return paths


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report DIR`` to the ``fedllm`` command; dispatch via ``args.handler``."""
    parser = subparsers.add_parser("report", help="write report.html / report.md / report.json for a run")
    parser.add_argument("dir", type=Path, help="the run directory")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    paths = write_reports(args.dir)
    for path in paths.values():
        print(path)
    return 0
