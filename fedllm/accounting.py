"""Privacy as data: the mechanism each client ran, and the accountants that turn it into epsilon.

A client's spend is nothing but a list of :class:`Mechanism` records (one per round it trained). Any
accountant can recompute epsilon from that list, which is what lets an auditor check a reported number
without trusting the code that reported it. The same list feeds Opacus (the accountant the run used) and
Google's ``dp-accounting`` (an independent implementation, used by the audit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

SAMPLING = "poisson"
NEIGHBOURING = "add_remove"
# Opacus' PRV accountant returns an upper bound within this additive error of the true epsilon.
PRV_EPS_ERROR = 0.01


@dataclass(frozen=True)
class Mechanism:
    """One round of DP-SGD on one client: ``steps`` Poisson-subsampled Gaussian mechanisms.

    Each step samples every example independently with probability ``sample_rate``, clips each
    per-example gradient to ``max_grad_norm`` and adds Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` to their sum. Neighbouring data sets differ by adding or removing
    one example (the relation Opacus' accountants assume).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    sampling: str = SAMPLING
    neighbouring: str = NEIGHBOURING

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def to_dp_event(self):  # -> dp_accounting.DpEvent; imported lazily: only the audit needs it
        """The same mechanism in Google dp-accounting's vocabulary, for independent recomputation."""
        import dp_accounting

        step = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


# A round in which nothing was released (refused, dropped): zero steps, composes to nothing.
NO_RELEASE = Mechanism(noise_multiplier=0.0, sample_rate=0.0, steps=0, max_grad_norm=0.0)


def history_of(mechanisms: Iterable[Mechanism]) -> list[tuple[float, float, int]]:
    """Opacus accountant history, in the canonical form its ``step()`` builds.

    Opacus merges consecutive steps with equal (noise, rate) into one entry; doing the same here makes a
    history rebuilt from the ledger identical, entry for entry, to the one the live accountant held.
    """
    history: list[tuple[float, float, int]] = []
    for m in mechanisms:
        if m.steps <= 0:
            continue
        if history and history[-1][0] == m.noise_multiplier and history[-1][1] == m.sample_rate:
            sigma, q, n = history[-1]
            history[-1] = (sigma, q, n + m.steps)
        else:
            history.append((m.noise_multiplier, m.sample_rate, m.steps))
    return history


def make_accountant(kind: str, history: Sequence[tuple[float, float, int]] = ()) -> IAccountant:
    accountant = create_accountant(mechanism=kind)
    accountant.history = [tuple(h) for h in history]
    return accountant


def epsilon_of(kind: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composed history; 0 for an empty one (nothing was released)."""
    return _epsilon_cached(kind, tuple(tuple(h) for h in history), delta)


@lru_cache(maxsize=1024)
def _epsilon_cached(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """A pure function of its arguments, and a PRV evaluation costs ~0.1 s: a client asks for the same
    history up to three times a round (spent, projected, reported)."""
    if not history:
        return 0.0
    accountant = make_accountant(kind, history)
    if kind == "prv":
        return float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(accountant.get_epsilon(delta=delta))


def epsilon_of_mechanisms(kind: str, mechanisms: Iterable[Mechanism], delta: float) -> float:
    return epsilon_of(kind, history_of(mechanisms), delta)


def dp_accounting_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon by Google's PLD accountant: an implementation independent of Opacus."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    events = [m.to_dp_event() for m in mechanisms if m.steps > 0]
    if not events:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def poisson_sample_rate(num_examples: int, expected_batch_size: int) -> float:
    """The rate Opacus' DPDataLoader uses for a loader of this size: one over the number of batches."""
    return 1.0 / math.ceil(num_examples / expected_batch_size)


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str
) -> float:
    """The smallest noise multiplier whose epsilon after the *whole planned schedule* stays <= target.

    Calibrating once for rounds x local steps (rather than per round) is what makes the budget last the
    whole run; the binary search stops within 0.01 below the target.
    """
    kwargs = {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
            **kwargs,
        )
    )
