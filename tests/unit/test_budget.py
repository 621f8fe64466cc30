"""The client enforces its own budget from its own records; restarts cannot make it forget."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fedllm.accounting import epsilon_of
from fedllm.budget import STATE_KEY, ClientBudget, plan_mechanism
from fedllm.config import ClientConfig, FederationConfig, PrivacyConfig, TrainingConfig
from fedllm.errors import ConfigError
from fedllm.ledger import Ledger

N, BATCH, STEPS = 800, 32, 20


def _plan(privacy: PrivacyConfig, rounds: int, declared: int | None = None):
    cfg = replace(
        FederationConfig(rounds=rounds, num_clients=1, training=TrainingConfig(local_steps=STEPS, batch_size=BATCH)),
        privacy=privacy,
        clients=(ClientConfig(id="a", declared_examples=declared),),
    )
    return plan_mechanism(cfg.client_settings("a"), num_examples=N, source="client 'a'")


def _train_round(budget: ClientBudget, mechanism, round_: int) -> bool:
    decision = budget.decide(mechanism)
    if not decision.allowed:
        budget.record(run_id="r", round=round_, status="refused", mechanism=mechanism, epsilon=decision.spent_epsilon)
        return False
    budget.record(run_id="r", round=round_, status="reserved", mechanism=mechanism, epsilon=decision.epsilon_after)
    budget.record(run_id="r", round=round_, status="trained", mechanism=mechanism, epsilon=budget.epsilon())
    return True


@pytest.mark.parametrize("k", [1, 3])
def test_budget_for_k_rounds_trains_k_and_refuses_the_next(tmp_path, k):
    privacy = PrivacyConfig(epsilon=4.0, delta=1e-5, planned_rounds=k)
    mechanism = _plan(privacy, k)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        budget = ClientBudget(ledger, "a", privacy, {})
        outcomes = [_train_round(budget, mechanism, r) for r in range(1, k + 3)]
        assert outcomes == [True] * k + [False, False]
        assert budget.epsilon() <= privacy.epsilon
        assert budget.epsilon() >= 0.95 * privacy.epsilon
        assert [e.status for e in ledger.entries() if e.status != "reserved"] == ["trained"] * k + ["refused"] * 2


def test_spend_survives_a_restart_through_the_ledger(tmp_path):
    privacy = PrivacyConfig(epsilon=8.0, planned_rounds=4)
    mechanism = _plan(privacy, 4)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        first = ClientBudget(ledger, "a", privacy, {})
        _train_round(first, mechanism, 1)
        _train_round(first, mechanism, 2)
        spent = first.epsilon()
    with Ledger(tmp_path / "ledger.sqlite") as ledger:  # a new process: fresh objects, no node state
        again = ClientBudget(ledger, "a", privacy, {})
        assert again.epsilon() == pytest.approx(spent, rel=1e-9)
        assert again.epsilon() == pytest.approx(
            epsilon_of(privacy.accountant, [(mechanism.noise_multiplier, mechanism.sample_rate, 40)], 1e-5)
        )


def test_a_deleted_ledger_is_refilled_from_node_state(tmp_path):
    privacy = PrivacyConfig(epsilon=8.0, planned_rounds=4)
    mechanism = _plan(privacy, 4)
    state: dict[str, str] = {}
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        budget = ClientBudget(ledger, "a", privacy, state)
        _train_round(budget, mechanism, 1)
        spent = budget.epsilon()
    assert len(json.loads(state[STATE_KEY])) == 1
    (tmp_path / "ledger.sqlite").unlink()
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        restored = ClientBudget(ledger, "a", privacy, state)
        assert restored.epsilon() == pytest.approx(spent)
        assert len(ledger.spent("a")) == 1  # written back to disk


def test_a_reserved_round_counts_even_if_training_never_finished(tmp_path):
    privacy = PrivacyConfig(epsilon=8.0, planned_rounds=4)
    mechanism = _plan(privacy, 4)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        budget = ClientBudget(ledger, "a", privacy, {})
        budget.record(run_id="r", round=1, status="reserved", mechanism=mechanism, epsilon=0.0)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ClientBudget(ledger, "a", privacy, {}).epsilon() > 0


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ConfigError, match=r"client 'a': delta: 0.01 must be < 1/n = 1/800"):
        _plan(PrivacyConfig(delta=0.01), 2)


def test_fixed_noise_multiplier_skips_calibration():
    assert _plan(PrivacyConfig(noise_multiplier=1.7), 3).noise_multiplier == 1.7
