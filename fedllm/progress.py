"""What a researcher sees: a progress bar over rounds and a closing table of budgets and accuracy."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedllm.config import FederationConfig
from fedllm.metrics import RoundRecord, RunMetrics

console = Console(stderr=True)


class RoundProgress:
    def __init__(self, rounds: int, enabled: bool = True, completed: int = 0):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("rounds", total=rounds, completed=completed, status="")

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def advance(self, record: RoundRecord) -> None:
        acc = f"acc {record.accuracy:.3f}" if record.accuracy is not None else ""
        self._progress.update(
            self._task, advance=1, status=f"{acc}  {record.aggregated} update(s)  {record.seconds:.0f}s"
        )


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def print_summary(metrics: RunMetrics, cfg: FederationConfig, wall: float, out_dir: Path) -> None:
    clients = Table(title="Privacy budget per client" + ("" if metrics.dp else " (NON-PRIVATE baseline)"))
    for col in ("client", "examples", "rounds trained", "epsilon", "budget", "delta", "device", "status"):
        clients.add_column(col, justify="right" if col not in ("client", "device", "status") else "left")
    final = metrics.final_clients()
    devices = metrics.devices()
    order = [c.id for c in cfg.clients if c.id in final] + [cid for cid in final if cid not in cfg.client_ids]
    for cid in order:
        c = final[cid]
        eps = _fmt(c.epsilon) if metrics.dp else "inf"
        budget = _fmt(c.budget_epsilon, 2) if metrics.dp else "-"
        status = "exhausted (refused)" if c.status == "refused" else c.status
        clients.add_row(
            cid,
            str(c.examples),
            str(metrics.rounds_trained(cid)),
            eps,
            budget,
            f"{c.delta:g}" if c.delta else "-",
            ", ".join(devices.get(cid, ())) or "-",
            status,
        )
    rounds = Table(title="Global model per round (coordinator's held-out set)")
    for col in ("round", "accuracy", "loss", "updates", "seconds"):
        rounds.add_column(col, justify="right")
    if metrics.initial_accuracy is not None:
        rounds.add_row("0", _fmt(metrics.initial_accuracy), _fmt(metrics.initial_loss), "-", "-")
    for r in metrics.rounds:
        rounds.add_row(str(r.round), _fmt(r.accuracy), _fmt(r.loss), str(r.aggregated), f"{r.seconds:.1f}")
    console.print(clients)
    console.print(rounds)
    if metrics.stopped_early:
        console.print(f"[yellow]stopped early:[/yellow] {metrics.stopped_early}")
    console.print(f"wall time {wall:.1f}s; records in {out_dir}")
