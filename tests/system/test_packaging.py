"""A plain (non-editable) install works: the wheel carries the scenarios and the apps, and nothing else.

The wheel is built from a copy of this tree, installed without dependencies into its own folder, and run
with that folder first on ``PYTHONPATH`` from an unrelated working directory, so every import below is the
wheel's fedllm and not the editable checkout (the test asserts that too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import setuptools
from support import ROOT, project_copy

from fedllm import metrics as run_metrics

PYTHON = [sys.executable, "-m"]


def _wheel(tmp: Path) -> Path:
    """Build fedllm's wheel from a copy of the tree (an in-tree build would leave ``build/`` behind)."""
    tree = project_copy(tmp / "tree")
    out = tmp / "wheel"
    cmd = [*PYTHON, "pip", "wheel", str(tree), "--no-deps", "-q", "-w", str(out)]
    if int(setuptools.__version__.split(".")[0]) >= 77:  # offline: the environment's setuptools builds it
        cmd.append("--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("fedllm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = _wheel(tmp)
    target = tmp / "site"
    subprocess.run(
        [*PYTHON, "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    return {"wheel": wheel, "target": target, "cwd": elsewhere, "env": env}


def _run(installed: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_wheel_holds_fedllm_its_scenarios_and_licence_and_no_generic_top_level_package(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {"fedllm", f"fedllm-{version('fedllm')}.dist-info"}
    scenarios = {n.removeprefix("fedllm/scenarios/") for n in names if n.startswith("fedllm/scenarios/")}
    assert {p.name for p in (ROOT / "simulations").glob("*.toml")} <= scenarios
    assert {"tiny.toml", "hospitals.toml", "banks.toml"} <= scenarios
    assert {"fedllm/apps/server.py", "fedllm/apps/client.py", "fedllm/__main__.py"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata


def test_the_installed_wheel_is_what_runs_and_finds_its_scenarios(installed):
    probe = (
        "import fedllm, fedllm.apps.server, fedllm.apps.client; from fedllm.config import scenario_path;"
        "print(fedllm.__file__); print(scenario_path('hospitals')); print(scenario_path('tiny'))"
    )
    proc = _run(installed, "-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = installed["target"].resolve()
    lines = [Path(line).resolve() for line in proc.stdout.split()]
    assert all(p.is_relative_to(target) for p in lines), lines
    assert [p.name for p in lines[1:]] == ["hospitals.toml", "tiny.toml"]


def test_python_m_fedllm_version_prints_the_distribution_version(installed):
    proc = _run(installed, "-m", "fedllm", "--version")
    assert (proc.returncode, proc.stdout.strip()) == (0, f"fedllm {version('fedllm')}"), proc.stderr[-2000:]


def test_what_needs_the_project_tree_says_so_from_a_wheel(installed):
    from fedllm.paths import has_project_tree

    assert has_project_tree()  # this checkout
    probe = "from fedllm.paths import project_tree; project_tree('fedllm run')"
    proc = _run(installed, "-c", probe)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedllm.errors.FedllmError: fedllm run needs fedllm's project tree, but fedllm is installed")
    proc = _run(installed, "-m", "fedllm.config_reference", "--check")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m fedllm.config_reference: needs fedllm's project tree (docs/); it is not installed here"
    ]


@pytest.mark.slow
def test_simulate_tiny_then_audit_from_the_installed_wheel(installed):
    out = installed["cwd"] / "run"
    sim = _run(installed, "-m", "fedllm", "simulate", "tiny", "--out", str(out), "--quiet", timeout=600)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    m = run_metrics.read(out / "metrics.json")
    assert [r.round for r in m.rounds] == [1, 2]
    assert all(c.status == "trained" and 0 < c.epsilon <= 8.0 for c in m.rounds[-1].clients.values())
    audit = _run(installed, "-m", "fedllm", "audit", str(out), timeout=300)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
