"""`flwr run .` runs the same ServerApp and ClientApp through a real SuperLink, Flower's own way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedllm import metrics as run_metrics
from fedllm.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]


def _stop_tree_under(marker: str) -> list[int]:
    """Stop the detached SuperLink (and its children) that this test's FLWR_HOME started, by PID."""
    stopped = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and ("flower-superlink" in cmdline or "flwr-simulation" in cmdline):
            for p in [*proc.children(recursive=True), proc]:
                try:
                    p.kill()
                    stopped.append(p.pid)
                except psutil.NoSuchProcess:
                    pass
    psutil.wait_procs([psutil.Process(p) for p in stopped if psutil.pid_exists(p)], timeout=10)
    return stopped


@pytest.mark.slow
def test_flwr_run_dot(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "the flwr command is installed with flwr"
    home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # offline: no `uv sync` of the app
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [
                flwr,
                "run",
                ".",
                "--stream",
                "--run-config",
                f"scenario='tiny' out-dir='{out}'",
                "--federation-config",
                "num-supernodes=3",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        stopped = _stop_tree_under(str(home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stopped, "flwr run left a SuperLink for us to stop"
    assert not [p for p in stopped if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    m = run_metrics.read(out / "metrics.json")
    assert [r.round for r in m.rounds] == [1, 2]
    assert all(c.status == "trained" and 0 < c.epsilon <= 8.0 for c in m.rounds[-1].clients.values())
    with Ledger(out / "ledger.sqlite") as ledger:
        assert len(ledger.entries(status="trained")) == 6 and ledger.verify_chain() == []
    assert time.monotonic() - started < 400
