"""The audit of a real ``fedllm simulate`` run: clean as it comes, and an edit to its ledger is caught."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.audit.verify import audit
from fedllm.ledger import read_entries


def _raw(path: Path) -> sqlite3.Connection:
    """What a tamperer does first: drop the append-only triggers."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
    conn.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    return conn


def _kinds(result) -> set[str]:
    return {f.split(":", 1)[0] for f in result.findings}


@pytest.mark.slow
def test_real_simulated_run_audits_clean_and_detects_an_edit(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedllm", "simulate", "tiny", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = audit(out)
    assert result.findings == [], result.findings
    assert all(c.rounds_trained >= 1 and c.reported_epsilon <= c.budget for c in result.clients)
    path = out / "ledger.sqlite"
    seq = read_entries(path)[0].seq
    _raw(path).execute("UPDATE entries SET epsilon = epsilon / 2 WHERE seq = ?", (seq,))
    assert "epsilon edited" in _kinds(audit(out))
