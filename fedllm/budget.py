"""A client's own privacy budget: what it has spent, what a round would cost, and the hard stop.

This runs on the node that holds the data, reads its spend from the node's own ledger (and Flower's node
state, whichever remembers more), and is the only thing that decides whether a round may train. The
coordinator sends nothing that can change it: not the budget, not the noise, not the number of rounds.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import lru_cache

from fedllm.accounting import (
    Mechanism,
    cached_calibration,
    epsilon_of_mechanisms,
    history_of,
)
from fedllm.config import ClientSettings, PrivacyConfig
from fedllm.errors import ConfigError
from fedllm.ledger import Ledger, make_entry

STATE_KEY = "fedllm.privacy"


@lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str) -> float:
    """Once per process from memory, once per machine from the disk cache (every Ray actor would recalibrate)."""
    return cached_calibration(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        total_steps=total_steps,
        accountant=accountant,
    )


def planned_sample_rate(declared_examples: int, batch_size: int) -> float:
    """The Poisson rate a client samples at: its expected batch over its *declared* (public) size.

    Fixed before any data is read, so the rate, and with it the noise, the epsilon and every record of
    them, cannot reveal the true number of rows; the loader draws at exactly this rate.
    """
    return min(1.0, batch_size / declared_examples)


def plan_mechanism(settings: ClientSettings, *, num_examples: int, source: str) -> Mechanism:
    """The mechanism of one round, with noise calibrated once for the whole planned schedule.

    ``num_examples`` (the private count) stands in for the declared size only where none is declared
    (simulation: the coordinator made the partition). ``delta`` must be below 1/n: a delta that large
    admits mechanisms that publish an example outright.
    """
    declared = settings.declared_examples or num_examples
    if settings.delta >= 1.0 / declared:
        raise ConfigError(
            f"{source}: delta: {settings.delta:g} must be < 1/n = 1/{declared} for a client with"
            f" {declared} {'declared ' if settings.declared_examples else ''}training examples"
        )
    q = planned_sample_rate(declared, settings.batch_size)
    sigma = settings.noise_multiplier or _calibrated(
        settings.epsilon, settings.delta, q, settings.planned_rounds * settings.local_steps, settings.accountant
    )
    return Mechanism(
        noise_multiplier=sigma, sample_rate=q, steps=settings.local_steps, max_grad_norm=settings.max_grad_norm
    )


def _mechanisms_from_json(text: str) -> list[Mechanism]:
    return [Mechanism(**m) for m in json.loads(text)]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    spent_epsilon: float  # before this round
    epsilon_after: float  # if this round trains


class ClientBudget:
    """Spend tracking and enforcement for one client id, backed by its ledger and its node state."""

    def __init__(
        self,
        ledger: Ledger,
        client_id: str,
        privacy: ClientSettings | PrivacyConfig,
        node_state: MutableMapping[str, str] | None = None,
    ):
        self.ledger = ledger
        self.client_id = client_id
        self.privacy = privacy
        self.node_state = node_state if node_state is not None else {}
        self._restore()

    def _restore(self) -> None:
        """Take whichever record remembers more spend; re-write the ledger if it forgot some.

        Both records are prefixes of the same history (the ledger is written first, the node state after),
        so the longer one is the truth. A ledger file that was deleted or replaced is refilled from the
        node state rather than trusted.
        """
        from_ledger = self.ledger.spent(self.client_id)
        from_state = _mechanisms_from_json(self.node_state.get(STATE_KEY, "[]"))
        if len(from_state) > len(from_ledger):
            for i in range(len(from_ledger), len(from_state)):
                self.ledger.append(
                    make_entry(
                        run_id="restored-from-node-state",
                        round=0,
                        client_id=self.client_id,
                        status="reserved",
                        mechanism=from_state[i],
                        delta=self.privacy.delta,
                        accountant=self.privacy.accountant,
                        epsilon=epsilon_of_mechanisms(self.privacy.accountant, from_state[: i + 1], self.privacy.delta),
                        budget_epsilon=self.privacy.epsilon,
                    )
                )
        self.spent = max(from_ledger, from_state, key=len)
        self._sync_state()

    def _sync_state(self) -> None:
        self.node_state[STATE_KEY] = json.dumps([m.as_dict() for m in self.spent])

    def epsilon(self) -> float:
        return epsilon_of_mechanisms(self.privacy.accountant, self.spent, self.privacy.delta)

    def history(self) -> list[tuple[float, float, int]]:
        return history_of(self.spent)

    def decide(self, mechanism: Mechanism) -> Decision:
        spent = self.epsilon()
        after = epsilon_of_mechanisms(self.privacy.accountant, [*self.spent, mechanism], self.privacy.delta)
        return Decision(allowed=after <= self.privacy.epsilon, spent_epsilon=spent, epsilon_after=after)

    def record(
        self,
        *,
        run_id: str,
        round: int,
        status: str,
        mechanism: Mechanism,
        epsilon: float,
        **hashes: str,
    ) -> None:
        """Append to the client's ledger; a ``reserved`` row also joins the spend, before training starts."""
        self.ledger.append(
            make_entry(
                run_id=run_id,
                round=round,
                client_id=self.client_id,
                status=status,
                mechanism=mechanism,
                delta=self.privacy.delta,
                accountant=self.privacy.accountant,
                epsilon=epsilon,
                budget_epsilon=self.privacy.epsilon,
                **hashes,
            )
        )
        if status == "reserved":
            self.spent = [*self.spent, mechanism]
            self._sync_state()
