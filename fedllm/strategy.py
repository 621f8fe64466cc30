"""FedAvg that respects client budgets, on Flower's legacy strategy API.

Legacy, because in Flower 1.42 secure aggregation (SecAgg+) runs only on the legacy workflow; keeping the
strategy there lets the same strategy run under plain or secure aggregation. The coordinator only
*observes* budgets: a client refuses by itself, and the strategy then stops selecting it and ends the run
cleanly when too few clients remain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from fedllm.checkpoint import arrays_hash
from fedllm.ledger import entry_from_metrics
from fedllm.metrics import ClientRound, RoundRecord, finite_or_none
from fedllm.run.recorder import Recorder
from fedllm.secure_aggregation import Masking, apply_delta

log = logging.getLogger("fedllm.server")

EvaluateFn = Callable[[list], tuple[float, float]]  # trainable arrays -> (loss, accuracy)


class _Eligible(Criterion):
    def __init__(self, excluded: set[str]):
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded


@dataclass(frozen=True)
class Selection:
    """Who is asked each round: ``clients_per_round`` of the ``num_clients`` registered, while at least
    ``min_clients`` have budget left."""

    num_clients: int
    clients_per_round: int
    min_clients: int


class BudgetAwareFedAvg(FedAvg):
    def __init__(
        self,
        *,
        initial_arrays: list,
        selection: Selection,
        recorder: Recorder,
        evaluate_central: EvaluateFn | None = None,
        federated_evaluation: bool = False,
        round_offset: int = 0,
        max_update_norm: float | None = None,
        masking: Masking | None = None,
    ):
        num_clients, clients_per_round = selection.num_clients, selection.clients_per_round
        # A masked sum of one update is that update: SecAgg+ rounds need two clients at least.
        min_clients = max(selection.min_clients, 2) if masking else selection.min_clients
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0 if federated_evaluation else 0.0,
            min_fit_clients=min_clients,
            min_evaluate_clients=min_clients,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters(initial_arrays),
            accept_failures=True,
            fit_metrics_aggregation_fn=lambda _: {},  # per-client metrics go to the ledger, not an average
        )
        self.reference = [np.asarray(a) for a in initial_arrays]  # shapes and dtypes every update must have
        self.max_update_norm = max_update_norm
        self._global = self.reference  # the model sent this round: updates are measured against it
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.num_clients = num_clients
        self.recorder = recorder
        self.evaluate_central = evaluate_central
        self.round_offset = round_offset  # rounds completed before a resume: Flower counts from 1 again
        self.masking = masking  # None: plain FedAvg on updates in clear
        self.exhausted: set[str] = set()  # node ids of clients that refused
        self.client_ids: dict[str, str] = {}  # node id -> institution id, learned from replies
        self._asked: list[str] = []
        self._round_started = time.monotonic()
        self._current: RoundRecord | None = None

    @property
    def stopped(self) -> bool:
        return self.recorder.stopped

    # ------------------------------------------------------------------------------------------ fit

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Only the round number travels to clients: nothing the server sends can change their budgets."""
        server_round += self.round_offset
        self._round_started = time.monotonic()
        if self.stopped:
            return []
        eligible = self.num_clients - len(self.exhausted)
        if eligible < self.min_clients:
            reason = (
                f"round {server_round}: only {eligible} client(s) with budget left, fewer than min_clients"
                f" = {self.min_clients}"
            )
            log.warning("stopping: %s", reason)
            self.recorder.stop(reason)
            return []
        sample = client_manager.sample(
            num_clients=min(self.clients_per_round, eligible),
            min_num_clients=self.num_clients,
            criterion=_Eligible(self.exhausted),
        )
        self._asked = [proxy.cid for proxy in sample]
        self._global = parameters_to_ndarrays(parameters)
        self._current = RoundRecord(round=server_round)
        fit_ins = FitIns(
            parameters, {"server-round": server_round, **(self.masking.to_config() if self.masking else {})}
        )
        return [(proxy, fit_ins) for proxy in sample]

    def _record_client(self, server_round: int, proxy: ClientProxy, res: FitRes) -> bool:
        """File the client's signed report in the run's ledger; True when its update joins the aggregate.

        The row is stored exactly as the client signed it. An update whose hash differs from the one the
        client reported, or a report for another round, is kept out of the aggregate and logged.
        """
        m = res.metrics
        entry = entry_from_metrics(m)
        self.client_ids[proxy.cid] = entry.client_id
        masked = self.masking is not None  # under SecAgg+ res.parameters is the round's sum, not this update
        update = parameters_to_ndarrays(res.parameters) if entry.status == "trained" and not masked else []
        problem = ""
        if entry.round != server_round:
            problem = f"report is for round {entry.round}"
        elif entry.status == "trained" and not masked:
            problem = self._update_problem(update) or (
                "" if arrays_hash(update) == entry.model_hash else "update does not match its reported model hash"
            )
        self.recorder.client_report(entry)
        assert self._current is not None
        self._current.clients[entry.client_id] = ClientRound(
            status=entry.status if not problem else "rejected",
            examples=int(res.num_examples),
            loss=finite_or_none(m.get("loss")),
            epsilon=finite_or_none(entry.epsilon),
            budget_epsilon=finite_or_none(entry.budget_epsilon),
            delta=entry.delta,
            device=str(m.get("device") or ""),
        )
        if problem:
            log.warning("client %s: %s; update rejected", entry.client_id, problem)
            return False
        if entry.status == "refused":
            self.exhausted.add(proxy.cid)
            log.warning("client %s refused round %s: budget exhausted", entry.client_id, server_round)
        return entry.status == "trained" and res.num_examples > 0

    def _record_dropped(self, server_round: int, node_id: str) -> None:
        """A sampled client that never answered: noted in the metrics and, once its id is known, the ledger."""
        client_id = self.client_ids.get(node_id)
        log.warning("client %s dropped out of round %s", client_id or f"node-{node_id}", server_round)
        assert self._current is not None
        self._current.clients[client_id or f"node-{node_id}"] = ClientRound(status="dropped")
        if client_id:
            self.recorder.dropped(server_round, client_id)

    def _update_problem(self, update: list[np.ndarray], check_norm: bool = True) -> str:
        """Why an update cannot be averaged in (wrong count, shape, dtype, or non-finite values), or ''."""
        if len(update) != len(self.reference):
            return f"update has {len(update)} tensors, expected {len(self.reference)}"
        for i, (got, ref) in enumerate(zip(update, self.reference, strict=True)):
            if got.shape != ref.shape or got.dtype != ref.dtype:
                return f"tensor {i} is {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}"
            if not np.isfinite(got).all():
                return f"tensor {i} holds NaN or Inf"
        if check_norm and self.max_update_norm is not None:
            norm = float(np.sqrt(sum(np.sum((u - g) ** 2) for u, g in zip(update, self._global, strict=True))))
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds max_update_norm {self.max_update_norm:g}"
        return ""

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        if self._current is None:
            self._current = RoundRecord(round=server_round)
        trained = [(proxy, res) for proxy, res in results if self._record_client(server_round, proxy, res)]
        answered = {proxy.cid for proxy, _ in results}
        for cid in self._asked:
            if cid not in answered:
                self._record_dropped(server_round, cid)
        self._current.aggregated = len(trained)
        if not trained:
            return None, {}
        if self.masking is not None:
            return self._aggregate_masked(results, contributors=len(trained))
        return super().aggregate_fit(server_round, trained, failures)

    def _aggregate_masked(
        self, results: list[tuple[ClientProxy, FitRes]], contributors: int
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """SecAgg+ hands over the weighted mean of the clients' deltas; no single update is ever seen.

        A bad report cannot be pulled out of a masked sum, so one invalid reply voids the whole round (the
        global model stays as it was); so does a mean that is not finite or not shaped like the model. A
        sum with one non-zero contribution *is* that contribution (the others refused and sent zeros of
        weight 0), so such a round is voided too: the coordinator never applies a lone update.
        """
        assert self._current is not None
        if any(c.status == "rejected" for c in self._current.clients.values()):
            log.warning("round %s: an invalid report is inside the masked sum; round discarded", self._current.round)
            self._current.aggregated = 0
            return None, {}
        if contributors < 2:
            log.warning(
                "round %s: only %d non-zero contribution(s) in the masked sum, which would reveal one update;"
                " round discarded",
                self._current.round,
                contributors,
            )
            self._current.aggregated = 0
            return None, {}
        mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        shapes_match = [d.shape for d in mean_delta] == [r.shape for r in self.reference]
        proposed = apply_delta(self._global, mean_delta) if shapes_match else mean_delta
        problem = self._update_problem(proposed, check_norm=False)
        if problem:
            log.warning("round %s: masked aggregate rejected: %s", self._current.round, problem)
            self._current.aggregated = 0
            return None, {}
        return ndarrays_to_parameters(proposed), {}

    # ------------------------------------------------------------------------------------------ evaluate

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Central evaluation on the coordinator's held-out set; closes the round's record (the recorder
        saves it in the order a resume relies on)."""
        if server_round > 0 and (self.stopped or self._current is None):
            return None
        if server_round == 0 and self.round_offset:
            return None  # resumed: the initial evaluation was recorded by the first run
        result = None
        if self.evaluate_central is not None:
            loss, accuracy = self.evaluate_central(parameters_to_ndarrays(parameters))
            result = (loss, {"accuracy": accuracy})
        if server_round == 0:
            loss, accuracy = (finite_or_none(result[0]), result[1]["accuracy"]) if result else (None, None)
            self.recorder.initial(loss, accuracy)
            return result
        record = self._current
        assert record is not None
        if result is not None:
            record.loss, record.accuracy = finite_or_none(result[0]), float(result[1]["accuracy"])
        record.seconds = time.monotonic() - self._round_started
        self._current = None
        self.recorder.close_round(record, parameters_to_ndarrays(parameters))
        return result

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        """Opt-in federated evaluation asks only this round's trainers, about the model they trained from.

        A client answers only for the model its own training started from in this round (it checks the
        hash), so the request carries that model and the round number, not the new aggregate.
        """
        if self.stopped or self.fraction_evaluate == 0.0:
            return []
        clients = client_manager.all()
        ins = EvaluateIns(ndarrays_to_parameters(self._global), {"server-round": server_round + self.round_offset})
        return [(clients[cid], ins) for cid in self._asked if cid in clients]

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        """Opt-in federated evaluation: each client's accuracy on its own held-out split."""
        if not results:
            return None, {}
        self.recorder.federated_evaluation(
            {str(r.metrics["client-id"]): (float(r.metrics["accuracy"]), int(r.num_examples)) for _, r in results}
        )
        return super().aggregate_evaluate(server_round, results, failures)
