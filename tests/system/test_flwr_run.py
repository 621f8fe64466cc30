"""`flwr run .` runs the same ServerApp and ClientApp through a real SuperLink, Flower's own way.

Flower's local federation simulates 2 SuperNodes unless told otherwise; the ServerApp checks that the count
matches the scenario's clients and otherwise stops at once, naming the ``--federation-config`` to pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.superlink.grid import InMemoryGrid

from fedllm import metrics as run_metrics
from fedllm.apps.server import check_simulated_nodes
from fedllm.config import load_config
from fedllm.errors import ConfigError
from fedllm.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]


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


class _SimulatedGrid(InMemoryGrid):
    """Flower's in-memory grid, whose nodes register ``late_s`` after the ServerApp starts (as they do)."""

    def __init__(self, nodes: int, late_s: float = 0.0) -> None:
        self.nodes, self.ready_at = nodes, time.monotonic() + late_s

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1)) if time.monotonic() >= self.ready_at else []


def test_a_simulated_federation_with_too_few_or_too_many_nodes_stops_at_once_naming_the_flag():
    cfg, _ = load_config("tiny")  # 3 clients
    expected = (
        "scenario 'tiny' has 3 clients but this simulated federation has {} SuperNodes: "
        'run `flwr run . --federation-config "num-supernodes=3"`'
    )
    for nodes in (2, 4):
        started = time.monotonic()
        with pytest.raises(ConfigError) as err:
            check_simulated_nodes(_SimulatedGrid(nodes), cfg, wait_s=0.5)
        assert str(err.value) == expected.format(nodes)
        assert time.monotonic() - started < 1.5  # the short wait for late registrations, no more


def test_nodes_that_register_after_the_server_app_starts_are_waited_for():
    cfg, _ = load_config("tiny")
    check_simulated_nodes(_SimulatedGrid(3, late_s=0.5), cfg, wait_s=5.0)  # no error


def test_a_deployed_grid_is_not_checked():
    class Deployed:  # any grid other than Flower's simulation grid: nodes join whenever they start
        def get_node_ids(self) -> list[int]:
            raise AssertionError("a deployed federation is not counted")

    cfg, _ = load_config("tiny")
    check_simulated_nodes(Deployed(), cfg)  # type: ignore[arg-type]


def _flwr_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """``flwr run . --stream ARGS`` against Flower's local simulation; its detached SuperLink stopped after."""
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr, "the flwr command is installed with flwr"
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # offline: no `uv sync` of the app
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        proc = subprocess.run(
            [flwr, "run", ".", "--stream", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
        )
    finally:
        stopped = _stop_tree_under(str(home))
    return proc, stopped


@pytest.mark.slow
def test_flwr_run_dot_with_flowers_default_two_nodes_fails_at_once_with_the_flag(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    proc, stopped = _flwr_run(tmp_path, "--run-config", f"scenario='tiny' out-dir='{out}'")
    assert stopped, "flwr run left a SuperLink for us to stop"
    line = (
        "fedllm.errors.ConfigError: scenario 'tiny' has 3 clients but this simulated federation has 2 SuperNodes: "
        'run `flwr run . --federation-config "num-supernodes=3"`'
    )
    assert line in proc.stdout.splitlines(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    assert time.monotonic() - started < 200  # Flower's start-up (SuperLink, Ray) and 10 s at most of waiting


@pytest.mark.slow
def test_flwr_run_dot(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    proc, stopped = _flwr_run(
        tmp_path, "--run-config", f"scenario='tiny' out-dir='{out}'", "--federation-config", "num-supernodes=3"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stopped, "flwr run left a SuperLink for us to stop"
    assert not [p for p in stopped if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    m = run_metrics.read(out / "metrics.json")
    assert [r.round for r in m.rounds] == [1, 2]
    assert all(c.status == "trained" and 0 < c.epsilon <= 8.0 for c in m.rounds[-1].clients.values())
    with Ledger(out / "ledger.sqlite") as ledger:
        assert len(ledger.entries(status="trained")) == 6 and ledger.verify_chain() == []
    assert time.monotonic() - started < 400
