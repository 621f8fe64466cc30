"""``metrics.json``: what happened in each round, written after every round so an early stop keeps it.

JSON has no infinity: the non-private baseline's epsilon is written as ``null`` with ``"dp": false``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedllm.files import atomic_write_json


@dataclass
class ClientRound:
    status: str  # trained | refused | failed | dropped
    examples: int = 0
    loss: float | None = None
    epsilon: float | None = None
    budget_epsilon: float | None = None
    delta: float | None = None
    test_accuracy: float | None = None  # on its local test split; only with federated_evaluation = true
    device: str = ""  # where it trained ("cpu", "cuda:0"): GPU placement is visible, not assumed


@dataclass
class RoundRecord:
    round: int
    loss: float | None = None
    accuracy: float | None = None
    aggregated: int = 0
    seconds: float = 0.0
    federated_accuracy: float | None = None  # example-weighted over clients' local test splits (opt-in)
    clients: dict[str, ClientRound] = field(default_factory=dict)


@dataclass
class RunMetrics:
    run_id: str
    scenario: str
    dp: bool
    rounds_planned: int
    initial_loss: float | None = None
    initial_accuracy: float | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    stopped_early: str | None = None
    wall_seconds: float = 0.0
    transport: str | None = None  # "in-process" (simulation), "tls" or "insecure"; None in older runs

    def final_clients(self) -> dict[str, ClientRound]:
        """Each client's latest record: its final epsilon and last status."""
        final: dict[str, ClientRound] = {}
        for r in self.rounds:
            for cid, c in r.clients.items():
                prev = final.get(cid)
                epsilon = c.epsilon if c.epsilon is not None else (prev.epsilon if prev else None)
                final[cid] = ClientRound(
                    status=c.status,
                    examples=c.examples or (prev.examples if prev else 0),
                    loss=c.loss,
                    epsilon=epsilon,
                    budget_epsilon=c.budget_epsilon if c.budget_epsilon is not None else (prev and prev.budget_epsilon),
                    delta=c.delta if c.delta is not None else (prev and prev.delta),
                    device=c.device or (prev.device if prev else ""),
                )
        return final

    def devices(self) -> dict[str, list[str]]:
        """Every device each client trained on, in first-use order (more than one means it moved)."""
        seen: dict[str, list[str]] = {}
        for r in self.rounds:
            for cid, c in r.clients.items():
                if c.device and c.device not in seen.setdefault(cid, []):
                    seen[cid].append(c.device)
        return seen

    def rounds_trained(self, client_id: str) -> int:
        return sum(1 for r in self.rounds if r.clients.get(client_id, ClientRound("")).status == "trained")


def finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def write(metrics: RunMetrics, path: Path) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    atomic_write_json(path, asdict(metrics))


def read(path: Path) -> RunMetrics:
    raw = json.loads(path.read_text())
    rounds = [
        RoundRecord(**{**r, "clients": {k: ClientRound(**v) for k, v in r["clients"].items()}}) for r in raw["rounds"]
    ]
    return RunMetrics(**{**raw, "rounds": rounds})
