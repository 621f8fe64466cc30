"""Accounting: the numbers every privacy claim rests on."""

from __future__ import annotations

from itertools import pairwise

import pytest
from opacus.accountants import PRVAccountant

from fedllm.accounting import (
    Mechanism,
    calibrate_noise,
    dp_accounting_epsilon,
    epsilon_of,
    epsilon_of_mechanisms,
    history_of,
    poisson_sample_rate,
)

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
    q = poisson_sample_rate(n, batch)
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, total_steps=steps, accountant=kind)
    eps = epsilon_of(kind, [(sigma, q, steps)], DELTA)
    assert 0.95 * target <= eps <= target


def test_poisson_sample_rate_matches_opacus_loader():
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(1000)), batch_size=32)
    assert poisson_sample_rate(1000, 32) == 1 / len(loader)
