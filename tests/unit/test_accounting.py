"""Accounting: the numbers every privacy claim rests on."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from opacus.accountants import PRVAccountant

from fedllm.accounting import (
    CALIBRATION_TOLERANCE,
    Mechanism,
    cached_calibration,
    calibrate_noise,
    dp_accounting_epsilon,
    epsilon_of,
    epsilon_of_mechanisms,
    history_of,
    make_accountant,
)
from fedllm.budget import planned_sample_rate

DELTA = 1e-5


def test_history_of_merges_like_opacus_step():
    """A history rebuilt from per-round records must equal the live accountant's, entry for entry."""
    rounds = [Mechanism(1.1, 0.02, 30, 1.0), Mechanism(1.1, 0.02, 30, 1.0), Mechanism(0.9, 0.05, 10, 1.0)]
    live = PRVAccountant()
    for m in rounds:
        for _ in range(m.steps):
            live.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    assert history_of(rounds) == live.history == [(1.1, 0.02, 60), (0.9, 0.05, 10)]


def test_epsilon_of_empty_history_is_zero():
    assert epsilon_of("prv", [], DELTA) == 0.0


def test_epsilon_grows_with_every_round():
    m = Mechanism(1.0, 0.016, 63, 1.0)
    eps = [epsilon_of_mechanisms("prv", [m] * k, DELTA) for k in range(1, 6)]
    assert all(b > a for a, b in pairwise(eps))


def test_notes_anchor_prv_and_rdp_values():
    """The shared notes' cross-checked case: q=0.016, sigma 1.0, 20x63 steps: PRV ~3.44, RDP ~3.80."""
    history = [(1.0, 0.016, 20 * 63)]
    assert epsilon_of("prv", history, DELTA) == pytest.approx(3.44, abs=0.05)
    assert epsilon_of("rdp", history, DELTA) == pytest.approx(3.80, abs=0.05)


def test_prv_agrees_with_independent_dp_accounting_pld():
    rounds = [Mechanism(1.0, 0.016, 63, 1.0)] * 20
    ours = epsilon_of_mechanisms("prv", rounds, DELTA)
    theirs = dp_accounting_epsilon(rounds, DELTA)
    assert ours == pytest.approx(theirs, rel=0.02)
    assert ours >= theirs - 0.01  # PRV reports an upper bound


@pytest.mark.parametrize(
    ("target", "n", "batch", "steps", "kind"),
    [(8.0, 2000, 32, 4 * 25, "prv"), (3.0, 1200, 32, 5 * 20, "prv"), (1.0, 5000, 64, 3 * 40, "rdp")],
)
def test_calibration_hits_the_target_over_the_whole_schedule(target, n, batch, steps, kind):
    """Claim 3: at the end of the planned schedule epsilon is within [0.95, 1.0] of the target."""
    q = planned_sample_rate(n, batch)
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, total_steps=steps, accountant=kind)
    eps = epsilon_of(kind, [(sigma, q, steps)], DELTA)
    assert 0.95 * target <= eps <= target


def test_the_planned_rate_is_the_rate_the_loader_draws_at():
    """One rule for the sample rate (expected batch over the declared size), used by the plan and the loader.

    It replaces ``1 / ceil(n / B)``, Opacus' rule, which differed from the loader's own for some (n, B)."""
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    q = planned_sample_rate(1000, 32)
    assert q == 32 / 1000
    assert DPDataLoader(TensorDataset(torch.zeros(1000, 1)), sample_rate=q).sample_rate == q


# ------------------------------------------------------------------ the "pld" accountant and its calibration

# A realistic client: expected batch 32 of 2,000 examples, 20 local steps a round.
Q, LOCAL_STEPS = 32 / 2000, 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("rounds", [1, 10, 100, 1000])
def test_pld_is_an_upper_bound_within_one_percent_of_fine_pld(target, rounds):
    """The "pld" accountant's epsilon, and its calibration, against dp-accounting's PLD at 1e-4.

    Every epsilon it reports must be at least the reference (it may never under-state the spend) and at
    most 1 % above it; calibration for the whole schedule must land in [target - 0.01, target].
    """
    steps = rounds * LOCAL_STEPS
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=Q, total_steps=steps, accountant="pld")
    ours = epsilon_of("pld", [(sigma, Q, steps)], DELTA)
    reference = dp_accounting_epsilon([Mechanism(sigma, Q, steps, 1.0)], DELTA)
    assert target - CALIBRATION_TOLERANCE <= ours <= target
    assert reference <= ours <= 1.01 * reference


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 8.0])
def test_pld_is_an_upper_bound_part_way_through_a_schedule(sigma):
    """Early rounds report small epsilons, where discretisation error is relatively largest."""
    for rounds in (1, 10):
        ours = epsilon_of("pld", [(sigma, Q, rounds * LOCAL_STEPS)], DELTA)
        reference = dp_accounting_epsilon([Mechanism(sigma, Q, rounds * LOCAL_STEPS, 1.0)], DELTA)
        assert reference <= ours <= 1.01 * reference


def test_pld_of_a_mixed_history_groups_by_mechanism():
    """Order does not change a composition: alternating rounds cost what two grouped entries cost."""
    a, b = Mechanism(1.0, Q, LOCAL_STEPS, 1.0), Mechanism(1.3, 0.03, LOCAL_STEPS, 1.0)
    alternating = [a, b] * 50
    ours = epsilon_of_mechanisms("pld", alternating, DELTA)
    assert ours == epsilon_of_mechanisms("pld", [a] * 50 + [b] * 50, DELTA)
    # The reference composes the same two mechanisms (100 separate events at 1e-4 would take minutes).
    reference = dp_accounting_epsilon(
        [Mechanism(1.0, Q, 50 * LOCAL_STEPS, 1.0), Mechanism(1.3, 0.03, 1000, 1.0)], DELTA
    )
    assert reference <= ours <= 1.01 * reference


def test_pld_accountant_plugs_into_opacus():
    """PrivacyEngine builds its accountant by name and advances it with step(); history as Opacus keeps it."""
    from opacus import PrivacyEngine

    assert PrivacyEngine(accountant="pld").accountant.mechanism() == "pld"
    accountant = make_accountant("pld", [(1.0, Q, 20)])
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=Q)
    accountant.step(noise_multiplier=0.9, sample_rate=Q)
    assert accountant.history == [(1.0, Q, 23), (0.9, Q, 1)]
    assert accountant.state_dict()["history"] == accountant.history
    assert accountant.get_epsilon(DELTA) == epsilon_of("pld", accountant.history, DELTA)


def test_calibration_is_cached_on_disk_by_its_inputs(cache, monkeypatch):
    import fedllm.accounting as accounting

    kwargs = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": Q, "total_steps": 200, "accountant": "pld"}
    sigma = cached_calibration(**kwargs)
    assert sigma == calibrate_noise(**kwargs)
    (entry,) = (cache / "calibration").glob("*.json")

    def fail(**_):
        raise AssertionError("recalibrated although the disk cache holds this mechanism")

    monkeypatch.setattr(accounting, "calibrate_noise", fail)
    assert cached_calibration(**kwargs) == sigma  # another process: read from disk
    with pytest.raises(AssertionError):  # any input that changes the mechanism is another key
        cached_calibration(**{**kwargs, "total_steps": 400})
    with pytest.raises(AssertionError):
        cached_calibration(**{**kwargs, "accountant": "rdp"})
    monkeypatch.setattr(accounting, "accountant_version", lambda kind: "another version")
    with pytest.raises(AssertionError):
        cached_calibration(**kwargs)
    assert entry.exists()


@pytest.mark.parametrize("corruption", ["{not json", '{"key": {}, "noise_multiplier": 0.1}', '{"key": 1}', ""])
def test_a_corrupt_cache_entry_is_ignored_and_rewritten(cache, corruption):
    kwargs = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": Q, "total_steps": 200, "accountant": "pld"}
    sigma = cached_calibration(**kwargs)
    (entry,) = (cache / "calibration").glob("*.json")
    entry.write_text(corruption)
    assert cached_calibration(**kwargs) == sigma
    assert json.loads(entry.read_text())["noise_multiplier"] == sigma
