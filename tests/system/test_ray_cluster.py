"""``fedllm simulate --ray-address``: the run joins a Ray cluster someone else started, and leaves it running.

A local Ray head on loopback stands in for a lab's cluster. The test checks from the cluster's own records
(its job and actor tables) that the simulation's process was a driver there and that Flower's client actors
ran in that job, then that the head is still up and serving, and finally stops the head by its PID and
checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]

# Reads the cluster's tables through a short-lived driver of its own (no dashboard needed: the GCS has them).
QUERY = """
import json, sys, warnings
warnings.simplefilter("ignore")
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
print(json.dumps({
    "jobs": [{"id": j["JobID"], "driver_pid": j["DriverPid"], "dead": j["IsDead"]} for j in state.jobs()],
    "actors": [{"class": a["ActorClassName"], "job": a["JobID"]} for a in state.actors().values()],
    "cpus": ray.cluster_resources().get("CPU", 0),
}))
ray.shutdown()
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _query(address: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", QUERY, address], capture_output=True, text=True, timeout=180, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _session(pid: int) -> list[psutil.Process]:
    """Every live process in the head's session: ``ray start`` and everything it spawned or daemonised."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@pytest.fixture
def ray_head():
    """A Ray head on loopback with 2 CPUs, no dashboard, every fixed port chosen free (other Ray users on
    this machine keep theirs), its own temp dir; stopped by PID afterwards, with everything it started."""
    port, client, agent, agent_grpc, env_agent, metrics = _free_ports(6)
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp) / "head.log", "w")  # closed below, after the head stops
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, f"ray start exited: {(Path(temp) / 'head.log').read_text()[-2000:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(0.5)
        yield head, address
    finally:
        started = _session(head.pid)
        head.send_signal(signal.SIGTERM)  # ray start --block stops what it started on SIGTERM
        _, alive = psutil.wait_procs(started, timeout=60)
        for p in alive:  # anything that outlived it, by PID
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        log.close()
        left = _session(head.pid)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes left by the Ray head: {[(p.pid, p.name()) for p in left]}"


def test_simulation_joins_an_existing_cluster_and_leaves_it_running(ray_head, tmp_path):
    head, address = ray_head
    before = _query(address)
    assert before["cpus"] == 2
    out = tmp_path / "run"
    env = {**os.environ, "FEDLLM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    sim = subprocess.Popen(
        [str(VENV_BIN / "fedllm"), "simulate", "tiny", "--ray-address", address, "--out", str(out), "--quiet"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = sim.communicate(timeout=1200)
    assert sim.returncode == 0, stderr[-3000:]
    assert f"joined Ray cluster {address}" in stderr
    assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["aggregated"] == 3

    # The cluster's own records: the simulation's process was a driver there, and its clients ran in that job.
    after = _query(address)
    (job,) = [j for j in after["jobs"] if j["driver_pid"] == sim.pid]
    assert job["dead"]  # its driver disconnected when it finished ...
    assert f"(job {job['id']})" in stderr
    assert any(a["class"] == "ClientAppActor" and a["job"] == job["id"] for a in after["actors"])
    # ... and the cluster did not go with it: the head still runs and serves a new driver.
    assert head.poll() is None
    assert after["cpus"] == 2
    assert not psutil.pid_exists(sim.pid)


def test_a_wrong_address_is_an_error_and_starts_nothing(tmp_path):
    """Joining never falls back to starting a cluster: no head at that address, no run."""
    (port,) = _free_ports(1)
    out = tmp_path / "run"
    result = subprocess.run(
        [str(VENV_BIN / "fedllm"), "simulate", "tiny", "--ray-address", f"127.0.0.1:{port}", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "FEDLLM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "simulation.ray_address: no Ray cluster at" in result.stderr
