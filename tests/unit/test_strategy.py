"""The coordinator files every client report and averages only well-formed, matching updates."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from support import make_strategy

from fedllm.accounting import Mechanism
from fedllm.checkpoint import arrays_hash
from fedllm.ledger import Ledger, entry_to_metrics, make_entry
from fedllm.secure_aggregation import Masking
from fedllm.strategy import BudgetAwareFedAvg

INITIAL = [np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]


def _strategy(tmp_path, max_update_norm: float | None = None, masking: Masking | None = None) -> BudgetAwareFedAvg:
    s = make_strategy(
        Ledger(tmp_path / "ledger.sqlite"), tmp_path, INITIAL, max_update_norm=max_update_norm, masking=masking
    )
    s._asked = ["1", "2"]
    s._current = None
    return s


def _reply(cid: str, client: str, arrays: list[np.ndarray], *, round_: int = 1, model_hash: str | None = None):
    entry = make_entry(
        run_id="r",
        round=round_,
        client_id=client,
        status="trained",
        mechanism=Mechanism(1.0, 0.1, 5, 1.0),
        delta=1e-5,
        accountant="prv",
        epsilon=1.0,
        budget_epsilon=8.0,
        model_hash=arrays_hash(arrays) if model_hash is None else model_hash,
    )
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, entry_to_metrics(entry))
    return SimpleNamespace(cid=cid), res


def _good(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, dtype=np.float32), np.full(4, value, dtype=np.float32)]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)], "NaN or Inf"),
        ([np.zeros((2, 3), np.float32), np.full(4, np.inf, np.float32)], "NaN or Inf"),
        ([np.zeros((3, 2), np.float32), np.zeros(4, np.float32)], "expected float32[2, 3]"),
        ([np.zeros((2, 3), np.float64), np.zeros(4, np.float32)], "expected float32[2, 3]"),
        ([np.zeros((2, 3), np.float32)], "update has 1 tensors, expected 2"),
    ],
)
def test_broken_updates_are_excluded_with_a_logged_reason(tmp_path, caplog, bad, reason):
    s = _strategy(tmp_path)
    params, _ = s.aggregate_fit(1, [_reply("1", "good", _good(2.0)), _reply("2", "bad", bad)], [])
    assert [a.tolist() for a in parameters_to_ndarrays(params)] == [a.tolist() for a in _good(2.0)]
    assert reason in caplog.text and "update rejected" in caplog.text
    assert s._current.clients["bad"].status == "rejected"
    s.recorder.close_round(s._current, INITIAL)  # what closing the round does
    assert len(s.recorder.ledger.entries()) == 2  # the report itself is still filed


def test_update_that_differs_from_its_reported_hash_is_excluded(tmp_path, caplog):
    s = _strategy(tmp_path)
    params, _ = s.aggregate_fit(
        1, [_reply("1", "a", _good(2.0)), _reply("2", "b", _good(4.0), model_hash="0" * 64)], []
    )
    assert parameters_to_ndarrays(params)[1].tolist() == [2.0] * 4
    assert "does not match its reported model hash" in caplog.text


def test_report_for_another_round_is_excluded(tmp_path, caplog):
    s = _strategy(tmp_path)
    params, _ = s.aggregate_fit(1, [_reply("1", "a", _good(2.0)), _reply("2", "b", _good(4.0), round_=7)], [])
    assert parameters_to_ndarrays(params)[0].tolist() == [[2.0] * 3] * 2
    assert "report is for round 7" in caplog.text


def test_good_updates_are_averaged_by_examples(tmp_path):
    s = _strategy(tmp_path)
    params, _ = s.aggregate_fit(1, [_reply("1", "a", _good(2.0)), _reply("2", "b", _good(4.0))], [])
    assert parameters_to_ndarrays(params)[1].tolist() == [3.0] * 4
    assert s.recorder.ledger.entries() == []  # filed only when the round closes, after the checkpoint
    s.recorder.close_round(s._current, INITIAL)
    assert [e.client_id for e in s.recorder.ledger.entries()] == ["a", "b"]
    assert s.recorder.ledger.entries()[0].signature == ""  # stored exactly as sent (unsigned here)


def test_update_beyond_the_norm_bound_is_excluded(tmp_path, caplog):
    s = _strategy(tmp_path, max_update_norm=5.0)  # good(1.0) moves by sqrt(10) = 3.2; good(2.0) by 6.3
    params, _ = s.aggregate_fit(1, [_reply("1", "a", _good(1.0)), _reply("2", "b", _good(2.0))], [])
    assert parameters_to_ndarrays(params)[1].tolist() == [1.0] * 4
    assert "update norm 6.325 exceeds max_update_norm 5" in caplog.text


MASKING = Masking(clipping_range=1.0, max_weight=10)


def _masked(s: BudgetAwareFedAvg, mean_delta: list[np.ndarray], *rounds: int):
    """What SecAgg+ hands the strategy: every result carries the unmasked mean delta, reports in clear."""
    replies = [_reply(str(i), f"c{i}", [np.zeros_like(a) for a in INITIAL], round_=r) for i, r in enumerate(rounds)]
    for _, res in replies:
        res.parameters = ndarrays_to_parameters(mean_delta)
    s._current = None
    return s.aggregate_fit(1, replies, [])


def test_masked_mean_delta_moves_the_global_model(tmp_path):
    s = _strategy(tmp_path, masking=MASKING)
    s._global = _good(1.0)
    delta = [np.full((2, 3), 0.25), np.full(4, -0.5)]  # SecAgg+ dequantizes to float64
    params, _ = _masked(s, delta, 1, 1)
    new = parameters_to_ndarrays(params)
    assert new[0].dtype == np.float32 and new[0].tolist() == [[1.25] * 3] * 2 and new[1].tolist() == [0.5] * 4
    assert s.min_fit_clients == 2  # a masked "sum" of one update would be that update


def test_masked_round_with_an_invalid_report_is_discarded(tmp_path, caplog):
    """A bad update cannot be pulled out of a masked sum: the round's aggregate is dropped as a whole."""
    s = _strategy(tmp_path, masking=MASKING)
    params, _ = _masked(s, [np.full((2, 3), 0.25), np.full(4, 0.25)], 1, 7)
    assert params is None and s._current.aggregated == 0
    assert "invalid report is inside the masked sum" in caplog.text


@pytest.mark.parametrize(
    ("mean", "reason"),
    [
        ([np.full((2, 3), np.nan), np.zeros(4)], "NaN or Inf"),
        ([np.zeros((3, 2)), np.zeros(4)], "expected float32[2, 3]"),
    ],
)
def test_masked_aggregate_that_is_not_a_model_is_rejected(tmp_path, caplog, mean, reason):
    s = _strategy(tmp_path, masking=MASKING)
    params, _ = _masked(s, mean, 1, 1)
    assert params is None and reason in caplog.text


def test_masked_round_tells_clients_the_grid(tmp_path):
    s = _strategy(tmp_path, masking=MASKING)
    manager = SimpleNamespace(sample=lambda **_: [SimpleNamespace(cid="1"), SimpleNamespace(cid="2")])
    pairs = s.configure_fit(1, ndarrays_to_parameters(INITIAL), manager)
    assert Masking.from_config(pairs[0][1].config) == MASKING
    plain = _strategy(tmp_path / "plain")
    assert Masking.from_config(plain.configure_fit(1, ndarrays_to_parameters(INITIAL), manager)[0][1].config) is None
