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
from pathlib import Path

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

from fedllm import metrics as run_metrics
from fedllm.accounting import NO_RELEASE
from fedllm.checkpoint import arrays_hash
from fedllm.ledger import Ledger, LedgerEntry, entry_from_metrics, make_entry
from fedllm.metrics import ClientRound, RoundRecord, RunMetrics, finite_or_none
from fedllm.secure_aggregation import Masking, apply_delta

log = logging.getLogger("fedllm.server")

EvaluateFn = Callable[[list], tuple[float, float]]  # trainable arrays -> (loss, accuracy)


class _Eligible(Criterion):
    def __init__(self, excluded: set[str]):
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded


class BudgetAwareFedAvg(FedAvg):
    def __init__(
        self,
        *,
        initial_arrays: list,
        num_clients: int,
        clients_per_round: int,
        min_clients: int,
        ledger: Ledger,
        metrics: RunMetrics,
        metrics_path: Path,
        config_hash: str,
        evaluate_central: EvaluateFn | None = None,
        federated_evaluation: bool = False,
        on_round: Callable[[RoundRecord], None] | None = None,
        round_offset: int = 0,
        max_update_norm: float | None = None,
        on_checkpoint: Callable[[int, list[np.ndarray]], None] | None = None,
        masking: Masking | None = None,
    ):
        # A masked sum of one update is that update: SecAgg+ rounds need two clients at least.
        min_clients = max(min_clients, 2) if masking else min_clients
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
        self.ledger = ledger
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.config_hash = config_hash
        self.evaluate_central = evaluate_central
        self.on_round = on_round
        self.round_offset = round_offset  # rounds completed before a resume: Flower counts from 1 again
        self.on_checkpoint = on_checkpoint
        self.masking = masking  # None: plain FedAvg on updates in clear
        self.exhausted: set[str] = set()  # node ids of clients that refused
        self.client_ids: dict[str, str] = {}  # node id -> institution id, learned from replies
        self._asked: list[str] = []
        self._round_started = time.monotonic()
        self._current: RoundRecord | None = None
        self._pending: list[LedgerEntry] = []  # this round's rows, filed when the round closes

    @property
    def stopped(self) -> bool:
        return self.metrics.stopped_early is not None

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
            self.metrics.stopped_early = (
                f"round {server_round}: only {eligible} client(s) with budget left, fewer than min_clients"
                f" = {self.min_clients}"
            )
            log.warning("stopping: %s", self.metrics.stopped_early)
            self.save()
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
        self._pending.append(entry)
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
        """A sampled client that never answered: noted in the metrics and, once its id is known, the ledger.

        The ledger row is the coordinator's own, unsigned note (no spend, no mechanism); the client's own
        ledger still holds whatever it reserved before it vanished.
        """
        client_id = self.client_ids.get(node_id)
        log.warning("client %s dropped out of round %s", client_id or f"node-{node_id}", server_round)
        assert self._current is not None
        self._current.clients[client_id or f"node-{node_id}"] = ClientRound(status="dropped")
        last = next(iter(self.ledger.entries(client_id=client_id)[-1:]), None) if client_id else None
        if last is None:
            return
        self._pending.append(
            make_entry(
                run_id=self.metrics.run_id,
                round=server_round,
                client_id=last.client_id,
                status="dropped",
                mechanism=NO_RELEASE,
                delta=last.delta,
                accountant=last.accountant,
                epsilon=last.epsilon,
                budget_epsilon=last.budget_epsilon,
                config_hash=self.config_hash,
            )
        )

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
        """Central evaluation on the coordinator's held-out set; closes the round's record.

        Order matters for resuming: the checkpoint is written before ``metrics.json``, so the metrics never
        claim a round the checkpoint does not hold.
        """
        if server_round > 0 and (self.stopped or self._current is None):
            return None
        if server_round == 0 and self.round_offset:
            return None  # resumed: the initial evaluation was recorded by the first run
        result = None
        if self.evaluate_central is not None:
            loss, accuracy = self.evaluate_central(parameters_to_ndarrays(parameters))
            result = (loss, {"accuracy": accuracy})
        if server_round == 0:
            if result is not None:
                self.metrics.initial_loss, self.metrics.initial_accuracy = (
                    finite_or_none(result[0]),
                    result[1]["accuracy"],
                )
            self.save()
            return result
        record = self._current
        assert record is not None
        if result is not None:
            record.loss, record.accuracy = finite_or_none(result[0]), float(result[1]["accuracy"])
        record.seconds = time.monotonic() - self._round_started
        if self.on_checkpoint is not None:
            self.on_checkpoint(record.round, parameters_to_ndarrays(parameters))
        self.file_pending()  # after the checkpoint: a resumed run never files a round twice
        self.metrics.rounds.append(record)
        self._current = None
        self.save()
        if self.on_round is not None:
            self.on_round(record)
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
        if not results or not self.metrics.rounds:
            return None, {}
        record = self.metrics.rounds[-1]
        total = sum(res.num_examples for _, res in results)
        for _, res in results:
            client = record.clients.get(str(res.metrics["client-id"]))
            if client is not None:
                client.test_accuracy = float(res.metrics["accuracy"])
        record.federated_accuracy = sum(float(r.metrics["accuracy"]) * r.num_examples for _, r in results) / max(
            total, 1
        )
        self.save()
        return super().aggregate_evaluate(server_round, results, failures)

    def file_pending(self) -> None:
        """Append this round's rows to the run's ledger in one go, in the order the replies arrived."""
        for entry in self._pending:
            self.ledger.append(entry)
        self._pending = []

    def save(self) -> None:
        run_metrics.write(self.metrics, self.metrics_path)
