"""Faults: a client that vanishes mid-round, and clients killed at several points of a round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedllm import faults
from fedllm import metrics as run_metrics
from fedllm.accounting import epsilon_of_mechanisms
from fedllm.audit.verify import audit
from fedllm.cli import main
from fedllm.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_vanished_client_does_not_stop_the_round(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.TESTING, "1")  # a fault switch works only in a test simulation
    monkeypatch.setenv(faults.VANISH, "client-1:2")  # inherited by the Ray workers started below
    out = tmp_path / "run"
    assert main(["simulate", "tiny", "--quiet", "--rounds", "3", "--out", str(out)]) == 0
    m = run_metrics.read(out / "metrics.json")
    assert [r.aggregated for r in m.rounds] == [3, 2, 3]
    assert {cid: c.status for cid, c in m.rounds[1].clients.items()} == {
        "client-0": "trained",
        "client-1": "dropped",
        "client-2": "trained",
    }
    with Ledger(out / "ledger.sqlite") as ledger:
        assert [(e.round, e.status) for e in ledger.entries(client_id="client-1")] == [
            (1, "trained"),
            (2, "dropped"),
            (3, "trained"),
        ]
    # the spend it reserved before vanishing still counts: round 3's epsilon composes all three rounds
    with Ledger(out / "clients" / "client-1" / "ledger.sqlite") as own:
        spent = own.spent("client-1")
        final = own.entries(status="trained")[-1]
    assert len(spent) == 3
    assert final.epsilon == pytest.approx(epsilon_of_mechanisms(final.accountant, spent, final.delta), rel=1e-9)
    result = audit(out)
    assert result.ok, result.findings


CLIENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fedllm.config import load_config
    from fedllm.client import FedClient
    from fedllm.model import build_model, get_trainable
    from fedllm.data.federation import federation_data

    cfg, _ = load_config("tiny", {"training.local_steps": int(sys.argv[2])})
    fed = federation_data(cfg)
    client = FedClient(config=cfg, client_id="client-0", state_dir=Path(sys.argv[1]), node_state={}, run_id="r")
    params = get_trainable(build_model(cfg.model, len(fed.label_names)))
    print("ready", flush=True)
    client.fit(params, {"server-round": int(sys.argv[3])})
    print("done", flush=True)
    """
)


def _statuses(state: Path) -> list[str]:
    path = state / "ledger.sqlite"
    if not path.exists():
        return []
    with Ledger(path) as ledger:
        return [e.status for e in ledger.entries()]


def _run_and_kill(state: Path, steps: int, round_: int, kill_when) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(state), str(steps), str(round_)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not kill_when(_statuses(state)):
            assert time.monotonic() < deadline and proc.poll() is None, "never reached the kill point"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "kill_when", "counted"),
    [
        ("before reserving", lambda s: True, 0),
        ("right after reserving", lambda s: s[-1:] == ["reserved"], 1),
        ("mid-training", lambda s: s[-1:] == ["reserved"] and time.sleep(2.0) is None, 1),
    ],
)
def test_a_killed_client_never_under_reports(tmp_path, point, kill_when, counted):
    """Restarted after a SIGKILL, the client reports at least what it spent: reservations count."""
    state = tmp_path / "client-0"
    _run_and_kill(state, steps=400, round_=1, kill_when=kill_when)
    with Ledger(state / "ledger.sqlite") as ledger:
        reserved = ledger.spent("client-0")
    assert len(reserved) == counted, point
    # restart: the next round's epsilon composes the killed round's reservation too
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(state), "400", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Ledger(state / "ledger.sqlite") as ledger:
        spent = ledger.spent("client-0")
        trained = ledger.entries(status="trained")[-1]
    assert len(spent) == counted + 1
    assert trained.epsilon == pytest.approx(epsilon_of_mechanisms(trained.accountant, spent, trained.delta), rel=1e-9)
    assert trained.epsilon >= epsilon_of_mechanisms(trained.accountant, spent[-1:], trained.delta)
