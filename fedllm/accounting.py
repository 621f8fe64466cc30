"""Privacy as data: the mechanism each client ran, and the accountants that turn it into epsilon.

A client's spend is nothing but a list of :class:`Mechanism` records (one per round it trained). Any
accountant can recompute epsilon from that list, which is what lets an auditor check a reported number
without trusting the code that reported it. The same list feeds Opacus (the accountant the run used) and
Google's ``dp-accounting`` (an independent implementation, used by the audit).

Three accountants: Opacus' ``prv`` and ``rdp``, and ``pld`` (dp-accounting's PLD with pessimistic
discretisation at an interval fitted to the mechanism: within 0.2 % above the fine reference and 10-30x
cheaper than PRV). All three are upper bounds on epsilon; RDP is the loosest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from opacus.accountants import IAccountant, create_accountant, register_accountant

from fedllm.files import atomic_write_text
from fedllm.paths import cache_dir

SAMPLING = "poisson"
NEIGHBOURING = "add_remove"
# Opacus' PRV accountant returns an upper bound within this additive error of the true epsilon.
PRV_EPS_ERROR = 0.01
# The "pld" accountant: Google dp-accounting's privacy loss distribution, discretised pessimistically (every
# privacy loss rounded up), so the result is an upper bound on epsilon. Its discretisation interval adapts to
# the mechanism: the coarsest (cheapest) interval whose estimated over-estimate is below PLD_REL_ERROR.
PLD_COARSEST_INTERVAL = 1e-2
PLD_REL_ERROR = 0.002
# The independent reference (the audit's, and the tests' bound): the same PLD at a fine interval. The "pld"
# accountant never goes finer, so where it needs the finest resolution it computes the reference itself.
REFERENCE_PLD_INTERVAL = 1e-4
MIN_PLD_INTERVAL = REFERENCE_PLD_INTERVAL
# Calibration stops once epsilon is within this much below the target (as Opacus' get_noise_multiplier).
CALIBRATION_TOLERANCE = 0.01
MAX_SIGMA = 1e6
# Bumped whenever calibrate_noise's search changes: part of every cache key.
CALIBRATION_VERSION = 2


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


def grouped(history: Iterable[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """The same composition with every (noise, rate) pair once: composition does not depend on order.

    This is what keeps the PLD accountant's cost flat in the number of rounds even when consecutive rounds
    differ (a ledger shared by runs with different schedules): it pays per distinct mechanism, not per entry.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if n > 0:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + int(n)
    return tuple((sigma, q, n) for (sigma, q), n in sorted(steps.items()))


def pld_epsilon(history: Iterable[tuple[float, float, int]], delta: float, interval: float) -> float:
    """Epsilon of a history by dp-accounting's PLD accountant, pessimistic discretisation at ``interval``.

    The one PLD computation in fedllm: the "pld" accountant uses it at an interval fitted to the mechanism,
    the audit's independent reference (:func:`dp_accounting_epsilon`) at ``REFERENCE_PLD_INTERVAL``.
    """
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
        )
        for sigma, q, n in history
        if n > 0
    ]
    if not events:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _adaptive_pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """The "pld" accountant: :func:`pld_epsilon` at the coarsest interval whose error is below PLD_REL_ERROR.

    The over-estimate of a pessimistic PLD shrinks like the square of the interval h (measured: 3x finer,
    9x smaller), so two evaluations at h and h' < h estimate the error at h' as (e(h) - e(h')) h'^2 /
    (h^2 - h'^2); the interval then jumps to the one that error model asks for, and the check repeats.
    The error that matters is set by the loss per step (about q / sigma), which the interval must resolve:
    a few rounds at small noise are fine at 1e-2, a thousand rounds at sigma 8 need about 1e-4, and cost
    stays near flat because the support shrinks as the needed resolution grows.
    """
    h, e_h = PLD_COARSEST_INTERVAL, pld_epsilon(history, delta, PLD_COARSEST_INTERVAL)
    fine = h / 2
    while True:
        e_fine = pld_epsilon(history, delta, fine)
        if not math.isfinite(e_fine):  # a noise-free step: no interval makes it finite
            return e_fine
        error = abs(e_h - e_fine) * fine**2 / (h**2 - fine**2)
        if error <= PLD_REL_ERROR * e_fine or fine <= MIN_PLD_INTERVAL:
            return e_fine
        # Aim at half the allowed error, and at least halve the interval, so the loop ends in a step or two.
        wanted = fine * math.sqrt(0.5 * PLD_REL_ERROR * e_fine / error)
        h, e_h = fine, e_fine
        fine = max(min(wanted, fine / 2), MIN_PLD_INTERVAL)


class PLDAccountant(IAccountant):
    """Opacus' accountant interface over :func:`pld_epsilon`, registered with Opacus as ``"pld"``.

    Opacus' PrivacyEngine builds its accountant by name and advances it through ``step``; the history it
    keeps (consecutive equal steps merged) is the same as Opacus' own PRV and RDP accountants keep, so
    :func:`history_of`, ``state_dict`` and the client's check of what ran hold for every accountant name.
    """

    def __init__(self) -> None:
        super().__init__()  # IAccountant declares __init__ abstract; it sets up the empty history

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float, **_: object) -> float:
        return epsilon_of("pld", self.history, delta)

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return "pld"


register_accountant("pld", PLDAccountant, force=True)  # force: a module reload must not fail


def make_accountant(kind: str, history: Sequence[tuple[float, float, int]] = ()) -> IAccountant:
    accountant = create_accountant(mechanism=kind)
    accountant.history = [tuple(h) for h in history]
    return accountant


def epsilon_of(kind: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composed history; 0 for an empty one (nothing was released)."""
    return _epsilon_cached(kind, tuple(tuple(h) for h in history), delta)


# The cache key of :func:`independent_epsilon` in the one epsilon cache (not an accountant a run can name).
_REFERENCE = "dp-accounting reference PLD"


@lru_cache(maxsize=1024)
def _epsilon_cached(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """A pure function of its arguments, and an evaluation costs 0.1-4 s: a client asks for the same
    history up to three times a round (spent, projected, reported), and an audit once per ledger row."""
    if not history:
        return 0.0
    if kind == _REFERENCE:
        return dp_accounting_epsilon([Mechanism(s, q, n, 1.0) for s, q, n in history], delta)
    if kind == "pld":
        return _adaptive_pld_epsilon(grouped(history), delta)
    accountant = make_accountant(kind, history)
    if kind == "prv":
        return float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(accountant.get_epsilon(delta=delta))


def epsilon_of_mechanisms(kind: str, mechanisms: Iterable[Mechanism], delta: float) -> float:
    """The accountant ``kind`` over these mechanisms (cached by their Opacus history: an audit recomputes
    many rows and clients that share one)."""
    return epsilon_of(kind, history_of(mechanisms), float(delta))


def independent_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """:func:`dp_accounting_epsilon` as the audit asks for it: cached, and over the Opacus history.

    Consecutive rounds with equal noise and rate are passed as one self-composition of all their steps:
    the same mechanism, mathematically, but PLD composes it by one FFT power instead of round by round.
    """
    return _epsilon_cached(_REFERENCE, tuple(history_of(mechanisms)), float(delta))


def dp_accounting_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon by Google's PLD accountant at a fine discretisation: an implementation independent of Opacus."""
    history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms]
    return pld_epsilon(history, delta, REFERENCE_PLD_INTERVAL)


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str
) -> float:
    """The smallest noise multiplier whose epsilon after the *whole planned schedule* stays <= target.

    Calibrating once for rounds x local steps (rather than per round) is what makes the budget last the
    whole run. The answer is always checked with exactly :func:`epsilon_of` (the function that later
    meters the spend), so the schedule provably fits, and lies within ``CALIBRATION_TOLERANCE`` below the
    target. For "pld" a search on single PLD evaluations at an interval set from sigma (where
    :func:`epsilon_of` needs two or three) finds the neighbourhood and the local slope first; the real
    accountant then needs a step or two.
    """

    def schedule(sigma: float) -> tuple[tuple[float, float, int]]:
        return ((sigma, sample_rate, total_steps),)

    start, slope = 1.0, -1.0
    if accountant == "pld":
        start, slope = _smallest_sigma(
            lambda sigma: pld_epsilon(schedule(sigma), delta, _search_interval(sigma)), target_epsilon
        )
    sigma, _ = _smallest_sigma(
        lambda sigma: epsilon_of(accountant, schedule(sigma), delta), target_epsilon, start, slope
    )
    return sigma


def _search_interval(sigma: float) -> float:
    """A PLD interval fine enough to steer the search (not to report): the loss per step shrinks with sigma,
    and the intervals :func:`_adaptive_pld_epsilon` settles on fall about like sigma^-1.5."""
    return PLD_COARSEST_INTERVAL / 2 * min(1.0, sigma**-1.5)


def _smallest_sigma(
    eps: Callable[[float], float], target: float, start: float = 1.0, slope: float = -1.0
) -> tuple[float, float]:
    """(sigma with ``target - CALIBRATION_TOLERANCE <= eps(sigma) <= target``, d log eps / d log sigma there).

    ``eps`` decreases in sigma and log epsilon is close to linear in log sigma, so secant steps on that
    scale (from ``slope`` until there are two points, inside the bracket once there is one, at most 2x a
    step on the hint and 4x on a measured slope) land within the tolerance in a handful of evaluations,
    where Opacus' bisection from [0, 20] needs a dozen: each evaluation is a full accounting of the schedule.
    """
    aim = math.log(target - CALIBRATION_TOLERANCE / 2)
    infeasible: tuple[float, float] | None = None  # (log sigma, log eps), eps > target
    feasible: tuple[float, float] | None = None  # eps <= target
    last: tuple[float, float] | None = None
    measured = False  # slope from two evaluations, not the hint: trust it for larger steps
    sigma = start
    for _ in range(200):
        if sigma > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
        e = eps(sigma)
        point = (math.log(sigma), math.log(e) if e > 0 else -math.inf)
        if last is not None and math.isfinite(point[1]) and math.isfinite(last[1]) and point[0] != last[0]:
            slope = min((point[1] - last[1]) / (point[0] - last[0]), -1e-3)
            measured = True
        if target - CALIBRATION_TOLERANCE <= e <= target:
            return float(sigma), slope
        if e > target:
            infeasible = point
        else:
            feasible = point
        last = point
        guess = point[0] + (aim - point[1]) / slope if math.isfinite(point[1]) else point[0] - math.log(2.0)
        step = math.log(4.0 if measured else 2.0)
        guess = min(max(guess, point[0] - step), point[0] + step)
        if infeasible and feasible:  # stay strictly inside the bracket
            lo, hi = infeasible[0], feasible[0]
            guess = min(max(guess, lo + 0.05 * (hi - lo)), hi - 0.05 * (hi - lo))
        sigma = math.exp(guess)
    raise RuntimeError("noise calibration did not converge")


def accountant_version(kind: str) -> str:
    """What a cached calibration depends on besides its inputs: the accountant's code and settings."""
    if kind == "pld":
        return (
            f"dp-accounting {version('dp-accounting')} pessimistic, interval from {PLD_COARSEST_INTERVAL:g}"
            f" to {MIN_PLD_INTERVAL:g} for relative error {PLD_REL_ERROR:g}"
        )
    settings = f" eps_error {PRV_EPS_ERROR:g}" if kind == "prv" else ""
    return f"opacus {version('opacus')} {kind}{settings}"


def cached_calibration(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str
) -> float:
    """:func:`calibrate_noise`, computed once per mechanism and kept on disk (every Ray actor, the CLI's
    preflight and every later run of the same schedule reuse it).

    The key is every input of the computation: the target, delta, rate and steps, the accountant and its
    version, and the version of the search. An entry that cannot be read, or whose stored key differs
    (a hash collision, a hand edit), is ignored and rewritten. A wrong value here could not overspend: the
    client meters every round with :func:`epsilon_of` and refuses the round that would pass its budget.
    """
    key = {
        "target_epsilon": float(target_epsilon),
        "delta": float(delta),
        "sample_rate": float(sample_rate),
        "total_steps": int(total_steps),
        "accountant": accountant,
        "accountant_version": accountant_version(accountant),
        "calibration_version": CALIBRATION_VERSION,
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".json"
    try:
        path: Path | None = cache_dir() / "calibration" / name
    except OSError:  # no writable cache at all: compute every time, as before there was one
        path = None
    sigma = _read_entry(path, key) if path is not None else None
    if sigma is None:
        sigma = calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            total_steps=total_steps,
            accountant=accountant,
        )
        if path is not None:
            _write_atomically(path, json.dumps({"key": key, "noise_multiplier": sigma}, sort_keys=True))
    return sigma


def _read_entry(path: Path, key: dict[str, object]) -> float | None:
    """The cached noise multiplier, or None for a missing, unreadable or mismatched entry."""
    try:
        entry = json.loads(path.read_text())
        sigma = float(entry["noise_multiplier"])
        return sigma if entry["key"] == key and math.isfinite(sigma) and sigma > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    """A concurrent reader (another Ray actor) sees the old entry or the new one; a read-only cache costs
    time, not correctness."""
    try:
        atomic_write_text(path, text)
    except OSError:
        return
