"""The one-run empirical audit's bound: correct membership guesses turned into a lower bound on epsilon.

Method: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846 (cited below as [SNJ23]; numbers of sections and results are those of arXiv v1; the
implementation reproduces the bounds the paper prints, see tests/unit/test_empirical.py). With r = k_+ + k_-
guesses of which v are correct, the largest epsilon at which an (epsilon, delta)-DP mechanism would make v
or more correct guesses with probability below 1 - confidence is the lower bound.

Pure mathematics: this module imports nothing of the project, so a report or an audit can use it without
the engine.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[at least v of r guesses are correct] when the mechanism is (epsilon, delta)-DP.

    [SNJ23] Corollary 5.4, the (eps, delta) form of their main theorem, as coded in their Appendix D
    (``p_value_DP_audit``): with
    q = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and
    f(w) = P[Binomial(r, q) >= w],

        P[W >= v]  <=  f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,

    where W is the number of correct guesses. The first term is the pure-DP bound (delta = 0: W is
    stochastically dominated by Binomial(r, q), the paper's main theorem); the second is how the paper
    pays for delta, summed over the m canaries (not the r guesses), which is why it grows with m.
    Capped at 1.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # f(v)
    alpha = 0.0
    if v > 0 and delta > 0:
        # f(v - i) - f(v) = P[v > Binomial(r, q) >= v - i] = sum_{j=1..i} pmf(v - j)
        gaps = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = max(0.0, float(np.max(gaps / np.arange(1, v + 1))))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct guesses out of r rule out at ``confidence``: eps such that
    ``p_value(m, r, v, eps, delta) < 1 - confidence``.

    The search of [SNJ23] Appendix D (``get_eps_audit``): the p-value grows with epsilon, so an upper end
    is found by steps of 1 and the crossing is bisected 30 times; the lower end is returned, so the answer
    errs on the side of a smaller (weaker) bound. 0 when even epsilon = 0 is not rejected, i.e. when the
    guesses are no better than chance at this confidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    lo, hi = 0.0, 1.0
    if p_value(m, r, v, lo, delta) >= beta:
        return 0.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi + 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo
