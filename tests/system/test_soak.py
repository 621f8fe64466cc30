"""Soak: 50 clients x 30 rounds on tiny-bert; memory at round 30 stays within 10% of round 5."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from fedllm.config import load_config
from fedllm.ledger import Ledger
from fedllm.run import lifecycle
from fedllm.run.spec import RunSpec


def _tree_rss() -> int:
    """Resident memory of this process and every process it started (Ray's workers included)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.slow
def test_fifty_clients_thirty_rounds_memory_is_flat(tmp_path: Path):
    cfg, _ = load_config(
        "tiny",
        {
            "rounds": 30,
            "num_clients": 50,
            "training.local_steps": 1,
            "data.test_fraction": 0.1,
            "data.max_central_test": 50,
            "privacy.epsilon": 50.0,
        },
    )
    samples: dict[int, int] = {}
    metrics = lifecycle.simulate(
        RunSpec(config=cfg, out_dir=tmp_path / "run"), on_round=lambda r: samples.__setitem__(r.round, _tree_rss())
    )
    assert [r.round for r in metrics.rounds] == list(range(1, 31))
    assert all(r.aggregated == 50 for r in metrics.rounds)
    ratio = samples[30] / samples[5]
    print(f"soak: rss round 5 {samples[5] / 2**20:.0f} MiB, round 30 {samples[30] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert ratio <= 1.10
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        assert len(ledger.entries(status="trained")) == 50 * 30
