"""One empirical audit's outcome: a plain record, importing nothing else of the project, so that whoever
reads one (audit, report, model card) never loads a model. The file it is stored in is
:mod:`fedllm.audit.empirical_store`'s."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ADVERSARIES = ("black-box",)
EMPIRICAL_VIOLATION = "empirical privacy violation"  # the audit finding's kind


@dataclass(frozen=True)
class EmpiricalResult:
    """One audited client's outcome. ``theoretical_epsilon`` is the epsilon the client reported in the run
    the canaries were in (None: non-private); ``reference_epsilon`` that of the original run, when the
    audit re-ran its config."""

    client: str
    adversary: str
    canaries: int  # m
    included: int
    guesses_in: int  # k_+
    guesses_out: int  # k_-
    correct: int  # v
    confidence: float
    delta: float
    lower_bound: float
    theoretical_epsilon: float | None
    dp: bool
    run_dir: str
    reference_epsilon: float | None = None
    reference_run: str | None = None

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out

    @property
    def violation(self) -> bool:
        """The bound exceeds what the client reported: at ``confidence``, the mechanism is not as private as
        its accountant says. A non-private run claims nothing, so it cannot be violated."""
        return self.theoretical_epsilon is not None and self.lower_bound > self.theoretical_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "guesses": self.guesses, "violation": self.violation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmpiricalResult:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        theory = "∞ (non-private)" if self.theoretical_epsilon is None else f"{self.theoretical_epsilon:.4f}"
        return (
            f"client {self.client}: empirical lower bound epsilon >= {self.lower_bound:.4f} at"
            f" {self.confidence:.0%} confidence ({self.correct} of {self.guesses} guesses correct, {self.canaries}"
            f" canaries, {self.adversary} adversary); reported epsilon {theory}"
        )
