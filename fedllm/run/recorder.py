"""The coordinator's record of a run, saved in the one order a crash can never make inconsistent.

A round closes as **checkpoint -> ledger -> metrics**: the checkpoint first, so a resumed run never files a
round twice (its rows are filed only once the model they produced is safe); the ledger before the metrics,
so ``metrics.json`` never claims a round whose clients' reports are missing. The strategy decides what a
reply means (selection, validation, aggregation); the recorder decides where and when it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedllm import checkpoint
from fedllm import metrics as run_metrics
from fedllm.accounting import NO_RELEASE
from fedllm.ledger import Ledger, LedgerEntry, make_entry
from fedllm.metrics import ClientRound, RoundRecord, RunMetrics
from fedllm.run.rundir import RunDir


@dataclass(frozen=True)
class ModelRecord:
    """What turns a checkpoint's arrays back into a model (``fedllm export``)."""

    names: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()


class Recorder:
    def __init__(
        self,
        run_dir: RunDir,
        ledger: Ledger,
        metrics: RunMetrics,
        config_hash: str,
        model: ModelRecord | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ):
        self.run_dir = run_dir
        self.ledger = ledger
        self.metrics = metrics
        self.config_hash = config_hash
        self.model = model  # None: no checkpoint (unit tests of the strategy)
        self.on_round = on_round
        self._pending: list[LedgerEntry] = []  # this round's rows, filed when the round closes

    @property
    def stopped(self) -> bool:
        return self.metrics.stopped_early is not None

    def stop(self, reason: str) -> None:
        self.metrics.stopped_early = reason
        self.save()

    def client_report(self, entry: LedgerEntry) -> None:
        """A client's signed row, kept exactly as signed until the round closes."""
        self._pending.append(entry)

    def dropped(self, round_: int, client_id: str) -> None:
        """The coordinator's own, unsigned note that a client it knows never answered (no spend, no mechanism);
        the client's own ledger still holds whatever it reserved before it vanished."""
        last = next(iter(self.ledger.entries(client_id=client_id)[-1:]), None)
        if last is None:
            return
        self._pending.append(
            make_entry(
                run_id=self.metrics.run_id,
                round=round_,
                client_id=last.client_id,
                status="dropped",
                mechanism=NO_RELEASE,
                delta=last.delta,
                accountant=last.accountant,
                epsilon=last.epsilon,
                budget_epsilon=last.budget_epsilon,
                config_hash=self.config_hash,
            )
        )

    def initial(self, loss: float | None, accuracy: float | None) -> None:
        self.metrics.initial_loss, self.metrics.initial_accuracy = loss, accuracy
        self.save()

    def close_round(self, record: RoundRecord, arrays: Sequence[np.ndarray]) -> None:
        """Checkpoint -> ledger -> metrics (module docstring), then tell whoever watches (progress bar)."""
        if self.model is not None:
            ckpt = checkpoint.Checkpoint(
                record.round,
                self.metrics.run_id,
                self.config_hash,
                list(arrays),
                names=self.model.names,
                labels=self.model.labels,
            )
            checkpoint.save(self.run_dir.checkpoint_path, ckpt)
        for entry in self._pending:  # in the order the replies arrived
            self.ledger.append(entry)
        self._pending = []
        self.metrics.rounds.append(record)
        self.save()
        if self.on_round is not None:
            self.on_round(record)

    def federated_evaluation(self, accuracies: dict[str, tuple[float, int]]) -> None:
        """Each trainer's accuracy on its own held-out split, and their example-weighted mean."""
        if not accuracies or not self.metrics.rounds:
            return
        record = self.metrics.rounds[-1]
        for client_id, (accuracy, _) in accuracies.items():
            client = record.clients.get(client_id)
            if client is not None:
                client.test_accuracy = accuracy
        total = sum(n for _, n in accuracies.values())
        record.federated_accuracy = sum(a * n for a, n in accuracies.values()) / max(total, 1)
        self.save()

    def save(self) -> None:
        run_metrics.write(self.metrics, self.run_dir.metrics_path)


__all__ = ["ClientRound", "ModelRecord", "Recorder"]
