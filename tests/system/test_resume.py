"""A coordinator killed mid-round resumes from its last completed round: same model, no round twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedllm import checkpoint, faults
from fedllm import metrics as run_metrics
from fedllm.checkpoint import arrays_hash
from fedllm.cli import main
from fedllm.ledger import Ledger

TINY = Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml"


def _scenario(tmp_path: Path, rounds: int) -> Path:
    """Budgets planned for twice the rounds: the round a kill interrupts is reserved, and rerun, for real."""
    path = tmp_path / "s.toml"
    text = TINY.read_text().replace("rounds = 2", f"rounds = {rounds}")
    path.write_text(text.replace("[privacy]", f"[privacy]\nplanned_rounds = {2 * rounds}"))
    return path


def _wait_for_round(metrics_path: Path, round_: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if metrics_path.exists():
            try:
                if len(run_metrics.read(metrics_path).rounds) >= round_:
                    return
            except (ValueError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError("round never completed")


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and every Ray process it started
    proc.wait(timeout=30)


def _wait_for_reservation(state: Path, round_: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if (state / "ledger.sqlite").exists():
            with Ledger(state / "ledger.sqlite") as own:
                if any(e.round == round_ for e in own.entries(status="reserved")):
                    return
        time.sleep(0.2)
    raise AssertionError(f"round {round_} never started")


@pytest.mark.slow
def test_sigkill_mid_round_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedllm", "simulate", str(_scenario(tmp_path, 4)), "--quiet", "--out", str(out)]
    # client-1 hangs in round 2 after reserving its spend: the kill lands mid-round, whatever the machine's speed
    env = {**os.environ, faults.TESTING: "1", faults.STALL: "client-1:2"}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _wait_for_round(out / "metrics.json", 1, proc)
        _wait_for_reservation(out / "clients" / "client-1", 2, proc)
    finally:
        _kill_group(proc)
    ckpt = checkpoint.load(out / "checkpoint.npz")
    done = ckpt.round
    assert done == 1 and len(run_metrics.read(out / "metrics.json").rounds) == done
    saved_model = arrays_hash(ckpt.arrays)

    assert main(["simulate", "--resume", str(out), "--quiet"]) == 0
    m = run_metrics.read(out / "metrics.json")
    assert [r.round for r in m.rounds] == [1, 2, 3, 4]
    with Ledger(out / "ledger.sqlite") as ledger:
        rows = [(e.client_id, e.round) for e in ledger.entries()]
        assert ledger.verify_chain() == []
        first_resumed = [e for e in ledger.entries() if e.round == done + 1]
        run_ids = {e.run_id for e in ledger.entries()}
    assert len(rows) == len(set(rows)) == 3 * 4  # no round counted twice
    # the first resumed round trained on the checkpointed global model
    with Ledger(out / "clients" / "client-0" / "ledger.sqlite") as own:
        reserved = [e for e in own.entries(status="reserved") if e.round == done + 1]
    assert reserved[-1].model_hash == saved_model
    assert {e.status for e in first_resumed} == {"trained"}
    assert len(run_ids) == 1  # the resumed run keeps its id


def test_resume_refuses_changed_config_and_completed_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", str(_scenario(tmp_path, 1)), "--quiet", "--out", str(out)]) == 0
    assert main(["simulate", "--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(out), "--rounds", "3"]) == 2
    assert "takes no scenario" in capsys.readouterr().err
    cfg = out / "config.toml"
    cfg.write_text(cfg.read_text().replace("rounds = 1", "rounds = 2").replace("epsilon = 8.0", "epsilon = 80.0"))
    assert main(["simulate", "--resume", str(out)]) == 2
    assert "changed since the run started" in capsys.readouterr().err
