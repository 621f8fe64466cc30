"""The coordinator's save order: checkpoint -> ledger -> metrics, whatever fails in between."""

from __future__ import annotations

import numpy as np
import pytest

from fedllm import checkpoint
from fedllm.accounting import NO_RELEASE
from fedllm.ledger import Ledger, make_entry
from fedllm.metrics import ClientRound, RoundRecord, RunMetrics
from fedllm.run.recorder import ModelRecord, Recorder
from fedllm.run.rundir import RunDir

ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3)]


def _entry(client: str, round_: int = 1):
    return make_entry(
        run_id="r", round=round_, client_id=client, status="trained", mechanism=NO_RELEASE, delta=1e-5,
        accountant="pld", epsilon=1.0, budget_epsilon=8.0, config_hash="c",
    )  # fmt: skip


def _recorder(tmp_path, ledger: Ledger, on_round=None) -> Recorder:
    metrics = RunMetrics(run_id="r", scenario="s", dp=True, rounds_planned=3)
    return Recorder(RunDir(tmp_path), ledger, metrics, "c", ModelRecord(("w",), ("a", "b")), on_round)


def test_a_round_closes_checkpoint_then_ledger_then_metrics(tmp_path) -> None:
    seen = []
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rec = _recorder(tmp_path, ledger, on_round=seen.append)
        rec.client_report(_entry("a"))
        rec.client_report(_entry("b"))
        assert ledger.entries() == []  # held until the round closes
        record = RoundRecord(round=1, accuracy=0.5, clients={"a": ClientRound("trained")})
        rec.close_round(record, ARRAYS)
        assert [e.client_id for e in ledger.entries()] == ["a", "b"]  # in the order the replies came
    run = RunDir(tmp_path)
    ckpt = run.read_checkpoint()
    assert ckpt.round == 1 and ckpt.names == ("w",) and ckpt.labels == ("a", "b")
    np.testing.assert_array_equal(ckpt.arrays[0], ARRAYS[0])
    assert [r.round for r in run.read_metrics().rounds] == [1]
    assert seen == [record]


def test_a_crash_while_filing_rows_leaves_metrics_behind_the_checkpoint(tmp_path, monkeypatch) -> None:
    """Metrics never claim a round whose rows are not filed; the checkpoint is already safe, so a resumed run
    continues after it and never files that round twice."""
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rec = _recorder(tmp_path, ledger)
        rec.save()
        rec.client_report(_entry("a"))

        def broken(entry):
            raise OSError("disk full")

        monkeypatch.setattr(ledger, "append", broken)
        with pytest.raises(OSError, match="disk full"):
            rec.close_round(RoundRecord(round=1), ARRAYS)
    run = RunDir(tmp_path)
    assert checkpoint.load(run.checkpoint_path).round == 1
    assert run.read_metrics().rounds == []


def test_a_crash_while_writing_the_checkpoint_files_nothing(tmp_path, monkeypatch) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rec = _recorder(tmp_path, ledger)
        rec.save()
        rec.client_report(_entry("a"))

        def broken(path, ckpt):
            raise OSError("disk full")

        monkeypatch.setattr(checkpoint, "save", broken)
        with pytest.raises(OSError):
            rec.close_round(RoundRecord(round=1), ARRAYS)
        assert ledger.entries() == []
    assert not RunDir(tmp_path).checkpoint_path.exists()
    assert RunDir(tmp_path).read_metrics().rounds == []


def test_a_dropped_client_is_noted_with_its_last_known_spend(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.append(_entry("a"))
        rec = _recorder(tmp_path, ledger)
        rec.dropped(2, "a")
        rec.dropped(2, "never-seen")  # no row of its own: nothing to carry forward
        rec.close_round(RoundRecord(round=2), ARRAYS)
        rows = ledger.entries()
    assert [(r.client_id, r.round, r.status, r.epsilon) for r in rows] == [
        ("a", 1, "trained", 1.0),
        ("a", 2, "dropped", 1.0),
    ]
    assert rows[1].mechanism == NO_RELEASE and rows[1].signature == ""


def test_federated_evaluation_is_the_example_weighted_mean(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rec = _recorder(tmp_path, ledger)
        rec.close_round(
            RoundRecord(round=1, clients={"a": ClientRound("trained"), "b": ClientRound("trained")}), ARRAYS
        )
        rec.federated_evaluation({"a": (0.5, 10), "b": (1.0, 30)})
    record = RunDir(tmp_path).read_metrics().rounds[0]
    assert record.federated_accuracy == pytest.approx(0.875)
    assert (record.clients["a"].test_accuracy, record.clients["b"].test_accuracy) == (0.5, 1.0)


def test_stopping_is_recorded_at_once(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rec = _recorder(tmp_path, ledger)
        rec.stop("round 2: only 1 client(s) with budget left")
        assert rec.stopped
    assert RunDir(tmp_path).read_metrics().stopped_early == "round 2: only 1 client(s) with budget left"
