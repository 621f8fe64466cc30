"""``fedllm audit DIR``: recompute and verify a run's privacy record, print the table, findings and verdict.

The audit itself is :func:`fedllm.audit.verify.audit`; this module is its command: flags, printing, exit
status (0 clean, 1 any finding, 3 unverified; ``fedllm.audit.findings.EXIT_STATUS``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedllm.audit.findings import CLEAN, DEFAULT_TOLERANCE, SAME_ACCOUNTANT_RTOL, UNVERIFIED, AuditResult, fmt


def print_audit(result: AuditResult, console: Any = None) -> None:
    """The per-client table, the tolerances used, the findings and the verdict."""
    from rich.console import Console
    from rich.table import Table

    from fedllm.accounting import PRV_EPS_ERROR  # loads opacus: only when there is a table to print

    console = console or Console()
    unverified = set(result.unverified) - set(result.flagged)
    title = f"Privacy audit of {result.run_dir}" + ("" if result.private else " (NON-PRIVATE run)")
    table = Table(title=title)
    for col in (
        "client",
        "rounds",
        "reported ε",
        f"recomputed ε ({result.accountant})",
        "dp-accounting ε (PLD)",
        "budget",
        "delta",
        "ok",
    ):
        table.add_column(col, justify="left" if col in ("client", "ok") else "right")
    for c in result.clients:
        table.add_row(
            c.client,
            str(c.rounds_trained),
            fmt(c.reported_epsilon),
            fmt(c.recomputed_epsilon),
            fmt(c.dp_accounting_epsilon),
            fmt(c.budget, 2),
            f"{c.delta:g}" if c.delta is not None else "-",
            "[green]yes[/]" if c.ok else ("[yellow]unverified[/]" if c.client in unverified else "[red]NO[/]"),
        )
    console.print(table)
    console.print(
        f"Same accountant must agree within {SAME_ACCOUNTANT_RTOL:g} relative; dp-accounting PLD within"
        f" {result.tolerance:.0%} relative (or {PRV_EPS_ERROR} absolute, PRV's error bound)."
    )
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    for finding in result.findings:
        console.print(f"FINDING: {finding}", style="red", highlight=False, markup=False)
    for gap in result.gaps:
        console.print(f"UNVERIFIED: {gap}", style="yellow", highlight=False, markup=False)
    style = {CLEAN: "bold green", UNVERIFIED: "bold yellow"}.get(result.status, "bold red")
    console.print(f"verdict: {result.verdict()}", style=style, highlight=False, markup=False)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tolerance: expected a number, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--tolerance: must be a relative tolerance in (0, 1), got {text}")
    return value


def register(subparsers: Any) -> None:
    """Add ``audit DIR [--tolerance T] [--json] [--empirical]`` to the ``fedllm`` command."""
    parser = subparsers.add_parser("audit", help="recompute and verify a run's privacy record")
    parser.add_argument("dir", type=Path, help="the run directory (holds ledger.sqlite)")
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help=f"relative tolerance against dp-accounting's PLD epsilon (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--empirical",
        action="store_true",
        help="also run a one-run empirical audit (canaries; re-runs config.toml into DIR/empirical/ unless the run"
        " was itself audited) and flag a lower bound above the reported epsilon",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """0 when the audit is clean, 1 on any finding, 3 when nothing was found but a client's ledger or key is
    missing (``EXIT_STATUS``): a script that only tests for 0 never mistakes an unchecked run for a clean one."""
    from fedllm.audit.empirical_rerun import audit_run
    from fedllm.audit.verify import audit

    if getattr(args, "empirical", False):
        audit_run(args.dir)  # stored in DIR/empirical/result.json, where audit() finds it
    result = audit(args.dir, args.tolerance)
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print_audit(result)
    return result.exit_status
