"""The cells both renderings of a report print (HTML and Markdown): one formatting, so they cannot differ."""

from __future__ import annotations

from typing import Any

from fedllm.audit.findings import id_list
from fedllm.report.curve import table

SHOWN_NEVER_SAMPLED = 10  # ids of never-sampled clients a page names; report.json holds all of them


def cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:g}"
    return str(value)


def eps_cell(value: float | None, dp: bool) -> str:
    return "∞ (non-private)" if not dp else cell(value)


def settings_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    run = report["run"]
    stopped = run["stopped_early"]
    return [
        ("scenario", run["scenario"]),
        ("run id", cell(run["run_id"])),
        ("rounds", f"{run['rounds_completed']} completed of {run['rounds_planned']} planned"),
        ("stopped early", stopped or "no"),
        ("clients", f"{run['num_clients']} (per round: {run['clients_per_round'] or 'all'})"),
        ("model", f"{cell(run['model']['name'])} ({cell(run['model']['mode'])})"),
        ("data", f"{cell(run['data']['source'])}, partition {cell(run['data']['partition'])}"),
        ("differential privacy", "on" if run["dp"] else "OFF (non-private baseline: epsilon = ∞)"),
        ("accountant", cell(run["accountant"])),
        ("delta (default)", f"{run['delta_default']:g}"),
        ("secure aggregation", "on" if run["secure_aggregation"] else "not used"),
        ("TLS", "on" if run["tls"] else "not used"),
    ]


def never_sampled_text(report: dict[str, Any]) -> str | None:
    """The configured clients that never took part, as one sentence (count and the first few ids); None when
    every configured client did. They get no row of their own: 10,000 registered clients are not 10,000 rows."""
    never = report.get("never_sampled") or {"count": 0, "ids": []}
    if not never["count"]:
        return None
    return (
        f"{never['count']} configured client(s) never took part (no row in the coordinator's ledger, no folder of"
        f" their own): {id_list(never['ids'], SHOWN_NEVER_SAMPLED)}. report.json lists every id."
    )


EMPIRICAL_HEAD = ["client", "theoretical ε", "empirical lower bound", "canaries m", "guesses", "correct", "adversary"]
EMPIRICAL_NOTE = (
    "One-run audit (Steinke, Nasr, Jagielski 2023): canaries hidden in the client's data by secret coins, guessed"
    " from the final model. The lower bound holds at the stated confidence for this adversary and these canaries"
    " only; it cannot prove privacy, a gap below the theoretical ε is expected, and a bound above it means the"
    " mechanism leaks more than it reports (docs/privacy.md)."
)


def empirical_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            a["client"],
            eps_cell(a["theoretical_epsilon"], a["dp"]),
            f"{a['lower_bound']:.4f} ({a['confidence']:.0%})" + (" VIOLATION" if a["violation"] else ""),
            str(a["canaries"]),
            f"{a['guesses']} ({a['guesses_in']} in, {a['guesses_out']} out)",
            str(a["correct"]),
            a["adversary"],
        ]
        for a in report.get("empirical_audit") or []
    ]


def curve_rows(curve: dict[str, Any]) -> list[list[str]]:
    """The curve's table, header first; the run whose report this is marked, the scenario shown when several."""
    with_scenario = len({p["scenario"] for p in curve["runs"]}) > 1
    rows = table(curve["runs"], with_scenario=with_scenario)
    col = 1 if with_scenario else 0
    this = curve.get("this_run")
    for row in rows[1:]:
        if row[col] == this:
            row[col] += " (this run)"
    return rows
