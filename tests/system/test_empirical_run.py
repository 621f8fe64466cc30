"""The one-run empirical audit on three real runs that must come out right: without DP the canaries are found,
with DP the bound stays below the reported epsilon, and a run whose noise is missing fails its audit.

tiny-bert in full fine-tuning, 1 client x 1 round, 200 canaries, 40 guesses (``support.EMPIRICAL_SCENARIO``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support import EMPIRICAL_SCENARIO

from fedllm.audit.empirical_result import EMPIRICAL_VIOLATION
from fedllm.audit.empirical_store import load_result
from fedllm.cli import main
from fedllm.config import from_dict
from fedllm.run.rundir import RunDir


def _simulate(tmp_path: Path, *flags: str) -> Path:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(EMPIRICAL_SCENARIO)
    out = tmp_path / "run"
    assert main(["simulate", str(scenario), "--quiet", "--out", str(out), *flags]) == 0
    return out


@pytest.mark.slow
def test_without_dp_the_canaries_are_found(tmp_path):
    """DP off, a memorising setting: the bound is clearly above zero. Also the ``audit --empirical`` path:
    the run's config.toml is re-run with canaries into DIR/empirical/rerun (a re-run needs only the config)."""
    from fedllm.config import to_toml
    from fedllm.ledger import Ledger

    raw = tomllib.loads(EMPIRICAL_SCENARIO)
    raw["privacy"]["enabled"] = False
    raw["empirical_audit"]["enabled"] = False  # the original run had no canaries
    # Without clipping, the DP runs' learning rate (5e-3) sometimes sent plain full fine-tuning astray (central
    # accuracy 0.46-0.66 instead of 1.0; 26-27 of 40 right, bound below 0.5); 1e-3 for twice the steps
    # memorises reliably (40 of 40 in each of 4 runs), whatever coins the OS draws.
    raw["training"]["local_steps"] = 400
    raw["training"]["learning_rate"] = 1e-3
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(from_dict(raw)))
    Ledger(run / "ledger.sqlite").close()
    assert main(["audit", str(run), "--empirical"]) == 0
    result = load_result(run)
    assert result is not None and result.reference_run == str(run)
    assert (RunDir(RunDir(run).empirical_rerun_dir).empirical_secret_path).is_file()
    assert not result.dp and result.theoretical_epsilon is None and not result.violation
    assert result.canaries == 200 and result.guesses == 40
    assert result.lower_bound > 0.5, result.describe()


@pytest.mark.slow
def test_with_dp_the_bound_stays_below_the_reported_epsilon(tmp_path, capsys):
    out = _simulate(tmp_path)
    result = load_result(out)
    assert result is not None and result.dp and result.theoretical_epsilon is not None
    assert 0 < result.theoretical_epsilon <= 0.25
    assert result.lower_bound <= result.theoretical_epsilon, result.describe()
    assert main(["audit", str(out)]) == 0
    assert "empirical audit" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    (row,) = report["empirical_audit"]
    assert row["client"] == "client-0" and row["violation"] is False
    assert row["theoretical_epsilon"] == pytest.approx(result.theoretical_epsilon)
    assert row["lower_bound"] == pytest.approx(result.lower_bound)


@pytest.mark.slow
def test_missing_noise_is_caught_although_the_ledger_looks_right(tmp_path, capsys):
    """FEDLLM_FAULT_NO_NOISE: DP-SGD adds no noise while the accountant records the planned noise. The
    ledger audit cannot see it; the empirical bound rises above the reported epsilon and fails the audit."""
    # In a process of its own: Flower reuses a Ray instance already up in this one, whose workers would not
    # see the variable; a fresh process starts a fresh Ray whose workers inherit it.
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(EMPIRICAL_SCENARIO)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedllm", "simulate", str(scenario), "--quiet", "--out", str(out)]
    done = subprocess.run(
        cmd, env={**os.environ, "FEDLLM_FAULT_NO_NOISE": "1", "FEDLLM_TESTING": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = load_result(out)
    assert result is not None and result.theoretical_epsilon is not None
    assert result.theoretical_epsilon <= 0.25  # the accountant still reports the planned spend
    assert result.violation and result.lower_bound > result.theoretical_epsilon, result.describe()

    capsys.readouterr()
    assert main(["audit", str(out)]) == 1
    printed = capsys.readouterr().out
    assert EMPIRICAL_VIOLATION in printed and "client-0" in printed
    assert main(["audit", str(out), "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert findings and all(f.startswith(EMPIRICAL_VIOLATION) for f in findings)  # the ledger itself is clean

    report = json.loads((out / "report.json").read_text())
    assert report["empirical_audit"][0]["violation"] is True
    assert "empirical-table" in (out / "report.html").read_text()

    # the coins stay with the auditor: not in what the coordinator wrote, and private on disk
    secret = RunDir(out).empirical_secret_path
    assert secret.stat().st_mode & 0o777 == 0o600
    assert RunDir(out).empirical_result_path.stat().st_mode & 0o777 == 0o600
    assert "included" not in (out / "config.toml").read_text()
    assert RunDir(out).client("client-0").extra_rows_path.is_file()
