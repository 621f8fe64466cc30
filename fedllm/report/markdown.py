"""``report.md``: the report's facts as Markdown tables, for a ticket or a pull request."""

from __future__ import annotations

from typing import Any

from fedllm.report.cells import (
    EMPIRICAL_HEAD,
    EMPIRICAL_NOTE,
    cell,
    curve_rows,
    empirical_rows,
    eps_cell,
    never_sampled_text,
    settings_rows,
)

_CURVE_NOTE = (
    "One row per run: its final central accuracy (metrics.json) against the largest final epsilon any of its"
    " clients spent; a non-private run has no epsilon (inf)."
)


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
    lines += ["## Settings", "", *_md_table(["setting", "value"], [list(r) for r in settings_rows(report)])]
    lines += ["## Clients", ""]
    lines += _md_table(
        ["client", "budget ε", "delta", "final ε", "rounds trained", "status per round", "key"],
        [
            [
                c["id"],
                eps_cell(c["budget_epsilon"], dp),
                f"{c['delta']:g}",
                eps_cell(c["final_epsilon"], dp),
                c["rounds_trained"],
                ", ".join(f"{n}: {s or '-'}" for n, s in zip(rounds, c["status_per_round"], strict=False)),
                c["key_fingerprint"] or "-",
            ]
            for c in report["clients"]
        ],
    )
    never = never_sampled_text(report)
    if never:
        lines += [_md(never), ""]
    if dp and rounds:
        lines += ["## Epsilon per round", ""]
        lines += _md_table(
            ["client", *[str(n) for n in rounds]],
            [[c["id"], *[cell(v) for v in c["epsilon_per_round"]]] for c in report["clients"]],
        )
    if report.get("curve"):
        lines += _curve_lines(report["curve"], f"This run and the other runs of {run['scenario']} in the same folder")
    lines += ["## Rounds", ""]
    initial = report["initial"]
    rows: list[list[Any]] = []
    if initial["accuracy"] is not None:
        rows.append(["0 (initial)", cell(initial["accuracy"]), cell(initial["loss"]), "-"])
    rows += [[r["round"], cell(r["accuracy"]), cell(r["loss"]), cell(r["aggregated"])] for r in report["rounds"]]
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
                    eps_cell(c["reported_epsilon"], c["private"]),
                    cell(c["recomputed_epsilon"]),
                    cell(c["dp_accounting_epsilon"]),
                    eps_cell(c["budget"], c["private"]),
                    cell(c["ok"]),
                ]
                for c in audit_["clients"]
            ],
        )
    lines += [f"- **finding:** {_md(f)}" for f in audit_["findings"]]
    lines += [f"- **unverified:** {_md(g)}" for g in audit_.get("gaps", [])]
    lines += [f"- note: {_md(n)}" for n in audit_["notes"]]
    if report.get("empirical_audit"):
        lines += ["", "## Empirical privacy audit", "", EMPIRICAL_NOTE, ""]
        lines += _md_table(EMPIRICAL_HEAD, empirical_rows(report))
    return "\n".join(lines).rstrip() + "\n"


def _curve_lines(curve: dict[str, Any], lead: str) -> list[str]:
    rows = curve_rows(curve)
    lines = ["## Accuracy vs epsilon", "", f"{_md(lead)} ({_md(curve['dir'])}). {_CURVE_NOTE}", ""]
    lines += _md_table(rows[0], rows[1:])
    lines += [f"- not included: {_md(s['run'])}: {_md(s['reason'])}" for s in curve.get("skipped", [])]
    return lines


def render_comparison_markdown(comparison: dict[str, Any]) -> str:
    lines = [f"# fedllm comparison: {_md(comparison['dir'])}", ""]
    lines += _curve_lines(comparison, "Every run in this folder")
    return "\n".join(lines).rstrip() + "\n"
