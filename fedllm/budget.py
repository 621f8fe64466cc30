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
    calibrate_noise,
    epsilon_of_mechanisms,
    history_of,
    poisson_sample_rate,
)
from fedllm.config import PrivacyConfig
from fedllm.errors import ConfigError
from fedllm.ledger import Ledger, make_entry

STATE_KEY = "fedllm.privacy"


@lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str) -> float:
    return calibrate_noise(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        total_steps=total_steps,
        accountant=accountant,
    )


def plan_mechanism(
    privacy: PrivacyConfig, *, num_examples: int, batch_size: int, local_steps: int, planned_rounds: int, source: str
) -> Mechanism:
    """The mechanism of one round, with noise calibrated once for the whole planned schedule.

    ``delta`` must be below 1/n: a delta that large admits mechanisms that publish an example outright.
    """
    if privacy.delta >= 1.0 / num_examples:
        raise ConfigError(
            f"{source}: delta: {privacy.delta:g} must be < 1/n = 1/{num_examples} for a client with"
            f" {num_examples} training examples"
        )
    q = poisson_sample_rate(num_examples, batch_size)
    sigma = privacy.noise_multiplier or _calibrated(
        privacy.epsilon, privacy.delta, q, planned_rounds * local_steps, privacy.accountant
    )
    return Mechanism(noise_multiplier=sigma, sample_rate=q, steps=local_steps, max_grad_norm=privacy.max_grad_norm)


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
        privacy: PrivacyConfig,
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
