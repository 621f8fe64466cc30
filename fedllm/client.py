"""One institution's Flower client: check the budget, reserve the spend, train with DP-SGD, send the update.

The order inside :meth:`FedClient.fit` is the privacy argument. The budget is checked against the
client's own ledger before anything touches the data; the round's spend is written (and fsync'd) before
training starts, so a crash can only over-count; the epsilon sent back is read from the accountant Opacus
advanced step by step, and must equal the projection the check approved. Every setting that decides the
spend or what leaves the node is a :class:`~fedllm.config.ClientSettings`: the scenario's in simulation,
the node profile's in deployment (a run asking for anything else is refused before data is read).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.client import NumPyClient

from fedllm import faults
from fedllm.accounting import NO_RELEASE, Mechanism, history_of, make_accountant
from fedllm.budget import ClientBudget, plan_mechanism
from fedllm.checkpoint import arrays_hash
from fedllm.config import ClientSettings, FederationConfig, ModelConfig, config_hash
from fedllm.data.federation import federation_data
from fedllm.errors import ConfigError
from fedllm.features import FeatureDataset
from fedllm.head_lora import HEAD_LORA, HEAD_PHASE, phase
from fedllm.ledger import Ledger, entry_to_metrics, make_entry
from fedllm.model import build_model, get_trainable, pick_device, set_trainable
from fedllm.node_assets import NodeAssets, assets_for, with_extra_rows
from fedllm.profile import NODE_CONFIG_KEY as PROFILE_KEY
from fedllm.profile import load_profile
from fedllm.run.rundir import ClientDir
from fedllm.run.spec import RunSpec
from fedllm.secure_aggregation import Masking, encode_update, zero_update
from fedllm.signing import load_or_create_key, public_openssh, sign
from fedllm.training import DPSettings, TokenizedDataset, evaluate, train_dp, train_plain

log = logging.getLogger("fedllm.client")

# Statuses a client reports for a round; the coordinator adds "dropped" for clients that never answered.
TRAINED, REFUSED = "trained", "refused"
# Node-state keys: the model a round's training started from (federated evaluation may score only that
# one, once), and the last round evaluated.
ROUND_MODEL_KEY, EVALUATED_KEY = "fedllm.round-model", "fedllm.evaluated-round"


class NodeState(MutableMapping[str, str]):
    """Flower's per-node state (survives across rounds of a run, not a node restart) as a str mapping."""

    RECORD = "fedllm"

    def __init__(self, context: Context):
        records = context.state.config_records
        if self.RECORD not in records:
            records[self.RECORD] = ConfigRecord()
        self._record = records[self.RECORD]

    def __getitem__(self, key: str) -> str:
        return str(self._record[key])

    def __setitem__(self, key: str, value: str) -> None:
        self._record[key] = value

    def __delitem__(self, key: str) -> None:
        del self._record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record)

    def __len__(self) -> int:
        return len(self._record)


@lru_cache(maxsize=1)
def _model(model_cfg: ModelConfig, num_labels: int) -> torch.nn.Module:
    """One model object per process; every round overwrites all its trainable tensors before use."""
    return build_model(model_cfg, num_labels)


@lru_cache(maxsize=64)
def _assets(config: FederationConfig, client_id: str, extra_rows: str | None = None) -> NodeAssets:
    """The client's partition, plus the rows of ``extra_rows`` when given; cached, so the node tokenizes once
    per run, not once per round."""
    fed = federation_data(config)
    split = next((c for c in fed.clients if c.client_id == client_id), None)
    if split is None:
        raise ConfigError(f"client '{client_id}': the run's data gives it no rows (a deployed node needs a profile)")
    if extra_rows is not None:
        split = with_extra_rows(split, Path(extra_rows), fed.label_names)
    return assets_for(config, split, len(fed.label_names))


@dataclass(frozen=True)
class LocalWork:
    """What one round trains: which module, on which rows, in which mode, at which learning rate.

    Only head-lora differs between rounds (:mod:`fedllm.head_lora`); the mechanism never does.
    """

    module: torch.nn.Module
    data: TokenizedDataset | FeatureDataset
    mode: str
    learning_rate: float
    physical_batch: int | None  # virtual steps bound memory where the encoder runs; feature rows never need them


class FedClient(NumPyClient):
    def __init__(
        self,
        *,
        config: FederationConfig,
        client_id: str,
        state_dir: Path,
        node_state: MutableMapping[str, str],
        run_id: str,
        assets: NodeAssets | None = None,
        signing_key: Path | None = None,
        settings: ClientSettings | None = None,
    ):
        self.config = config
        # In deployment the node key the consortium registered also signs this client's ledger rows.
        self.signing_key = signing_key or ClientDir(state_dir).key_path
        self.client_id = client_id
        # A deployed node passes its profile's settings (already checked equal to the run's).
        self.privacy = settings or config.client_settings(client_id)
        self.state_dir = state_dir
        self.node_state = node_state
        self.run_id = run_id
        self.assets = assets or _assets(config, client_id)
        self.config_hash = config_hash(config)  # identifies the settings in every ledger row this client writes
        self.device = pick_device(config.training.device)

    # -------------------------------------------------------------------------------------------- helpers

    def _model_with(self, parameters: list[np.ndarray]) -> torch.nn.Module:
        model = _model(self.config.model, self.assets.num_labels)
        set_trainable(model, parameters)
        return model

    def _work(self, model: torch.nn.Module, server_round: int) -> LocalWork:
        m, t = self.config.model, self.config.training
        mode = phase(m.mode, m.head_rounds, server_round, model)
        if m.mode == HEAD_LORA and mode == HEAD_PHASE:  # LoRA inactive: the cached features are the encoder's
            return LocalWork(model.head, self.assets.head_train, HEAD_PHASE, t.learning_rate, None)
        lr = (t.lora_learning_rate or t.learning_rate) if m.mode == HEAD_LORA else t.learning_rate
        return LocalWork(model, self.assets.train, mode, lr, None if mode == "head" else t.max_physical_batch)

    def _mechanism(self) -> Mechanism:
        return plan_mechanism(self.privacy, num_examples=len(self.assets.train), source=f"client '{self.client_id}'")

    @property
    def weight(self) -> int:
        """This client's FedAvg weight: its declared (public) size, never its true count where one is declared."""
        return self.privacy.declared_examples or len(self.assets.train)

    def _report(
        self, server_round: int, status: str, mechanism: Mechanism, epsilon: float, update: list[np.ndarray] | None
    ) -> dict:
        """The round's ledger row, signed with this node's key: the coordinator files it verbatim.

        The signature covers the mechanism, epsilon and budget, so neither the coordinator nor anyone
        after it can alter what this client says it spent without the audit noticing.
        """
        dp = self.privacy.enabled
        entry = make_entry(
            run_id=self.run_id,
            round=server_round,
            client_id=self.client_id,
            status=status,
            mechanism=mechanism,
            delta=self.privacy.delta,
            accountant=self.privacy.accountant if dp else "none",
            epsilon=epsilon,
            budget_epsilon=self.privacy.epsilon if dp else math.inf,
            config_hash=self.config_hash,
            model_hash=arrays_hash(update) if update else "",
        )
        key = load_or_create_key(self.signing_key)
        entry = replace(entry, signer=public_openssh(key), signature=sign(key, entry.signed_payload()))
        return entry_to_metrics(entry)

    def _send(
        self, update: list[np.ndarray], received: list[np.ndarray], config: dict, metrics: dict
    ) -> tuple[list[np.ndarray], int, dict]:
        """The reply to a training request: the trained tensors in clear, or a delta ready for masking."""
        masking = Masking.from_config(config)
        metrics["device"] = str(self.device)  # where it trained (not data-dependent): shown in the run's table
        if masking is None:
            return update, self.weight, metrics
        delta, weight = encode_update(update, received, self.weight, masking)
        return delta, weight, metrics

    def _opt_in_metrics(self, metrics: dict) -> dict:
        """Per-client training loss leaves the node only where the scenario opts in: it describes local data."""
        return metrics if self.privacy.share_client_metrics else {}

    @staticmethod
    def _outgoing_nothing(received: list[np.ndarray], config: dict) -> list[np.ndarray]:
        """A client that does not train sends nothing, or, under SecAgg+, a zero delta of weight 0."""
        return zero_update(received) if Masking.from_config(config) else []

    # -------------------------------------------------------------------------------------------- Flower

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        server_round = int(config.get("server-round", 0))
        self.node_state[ROUND_MODEL_KEY] = f"{server_round}:{arrays_hash(parameters)}"
        if not self.privacy.enabled:
            return self._fit_plain(parameters, server_round, config)
        with Ledger(ClientDir(self.state_dir).ledger_path) as ledger:
            budget = ClientBudget(ledger, self.client_id, self.privacy, self.node_state)
            mechanism = self._mechanism()
            decision = budget.decide(mechanism)
            record = partial(
                budget.record,
                run_id=self.run_id,
                round=server_round,
                model_hash=arrays_hash(parameters),
                config_hash=self.config_hash,
            )
            if not decision.allowed:
                log.warning(
                    "client %s refuses round %s: epsilon would reach %.4f > budget %.4f (spent %.4f)",
                    self.client_id,
                    server_round,
                    decision.epsilon_after,
                    self.privacy.epsilon,
                    decision.spent_epsilon,
                )
                record(status=REFUSED, mechanism=NO_RELEASE, epsilon=decision.spent_epsilon)
                metrics = self._report(server_round, REFUSED, NO_RELEASE, decision.spent_epsilon, None)
                metrics["projected-epsilon"] = decision.epsilon_after
                return self._outgoing_nothing(parameters, config), 0, metrics
            history_before = budget.history()
            # Write-ahead: the spend is on disk before a single example is read.
            record(status="reserved", mechanism=mechanism, epsilon=decision.epsilon_after)
            try:  # from here on, whatever fails leaves a "failed" row; the reserved spend stays counted
                faults.maybe_vanish_or_stall(self.client_id, server_round)
                accountant = make_accountant(self.privacy.accountant, history_before)
                model = self._model_with(parameters)
                work = self._work(model, server_round)
                torch.seed()  # fresh, unpredictable noise and sampling: the model build reseeded the RNG
                result = train_dp(
                    work.module,
                    work.data,
                    steps=mechanism.steps,
                    batch_size=self.privacy.batch_size,
                    learning_rate=work.learning_rate,
                    dp=DPSettings(
                        mechanism.noise_multiplier, mechanism.max_grad_norm, work.mode, mechanism.sample_rate
                    ),
                    accountant=accountant,
                    device=self.device,
                    max_physical_batch=work.physical_batch,
                    optimizer=self.config.training.optimizer,
                )
                if accountant.history != history_of(budget.spent) or result.sample_rate != mechanism.sample_rate:
                    raise RuntimeError("the mechanism that ran differs from the one reserved; refusing to report")
            except BaseException:
                record(status="failed", mechanism=mechanism, epsilon=decision.epsilon_after)
                raise
            epsilon = budget.epsilon()
            record(status=TRAINED, mechanism=mechanism, epsilon=epsilon)
        update = get_trainable(model)
        metrics = self._report(server_round, TRAINED, mechanism, epsilon, update)
        metrics.update(self._opt_in_metrics({"loss": result.loss, "empty-batches": result.empty_batches}))
        return self._send(update, parameters, config, metrics)

    def _fit_plain(
        self, parameters: list[np.ndarray], server_round: int, config: dict
    ) -> tuple[list[np.ndarray], int, dict]:
        """The non-private baseline, labelled as such in every record (epsilon infinite)."""
        model = self._model_with(parameters)
        work = self._work(model, server_round)
        result = train_plain(
            work.module,
            work.data,
            steps=self.privacy.local_steps,
            batch_size=self.privacy.batch_size,
            learning_rate=work.learning_rate,
            device=self.device,
            optimizer=self.config.training.optimizer,
        )
        mechanism = Mechanism(0.0, result.sample_rate, result.steps, math.inf)
        update = get_trainable(model)
        metrics = self._report(server_round, TRAINED, mechanism, math.inf, update)
        metrics.update(self._opt_in_metrics({"loss": result.loss}))
        return self._send(update, parameters, config, metrics)

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        """Accuracy on the node's held-out test split, for the one model this round trained from, once.

        The test split is not covered by DP-SGD (it never trains), so an answer discloses something about
        those rows: the node answers only where its settings opt in (``federated_evaluation``), only for the
        model its training in this round started from (hash check: a coordinator cannot probe it with
        models of its choosing) and at most once per round. The weight is 1, not the test split's size.
        """
        if not self.privacy.federated_evaluation:
            raise PermissionError(f"client {self.client_id}: federated evaluation is off on this node; not answering")
        server_round = int(config.get("server-round", -1))
        expected = self.node_state.get(ROUND_MODEL_KEY, "")
        if expected != f"{server_round}:{arrays_hash(parameters)}":
            raise PermissionError(
                f"client {self.client_id}: evaluation refused: round {server_round}'s model is not the one this"
                " node trained from in that round"
            )
        if self.node_state.get(EVALUATED_KEY) == str(server_round):
            raise PermissionError(f"client {self.client_id}: evaluation refused: round {server_round} already answered")
        self.node_state[EVALUATED_KEY] = str(server_round)
        model = self._model_with(parameters)
        loss, accuracy = evaluate(
            model, self.assets.test, batch_size=self.config.training.eval_batch_size, device=self.device
        )
        return float(loss), 1, {"accuracy": accuracy, "client-id": self.client_id}


def client_for(spec: RunSpec, context: Context) -> FedClient:
    """Simulation: the node's partition id picks its institution from the scenario's client list.

    A deployed node names its profile in its node config instead; see :func:`client_for_profile`.
    """
    if PROFILE_KEY in context.node_config:
        return client_for_profile(spec, context)
    faults.refuse_if_set("simulation")
    partition = int(context.node_config["partition-id"])
    client_id = spec.config.clients[partition].id
    return FedClient(
        config=spec.config,
        client_id=client_id,
        state_dir=spec.client_dir(client_id),
        node_state=NodeState(context),
        run_id=spec.run_id or str(context.run_id),
        assets=_assets(spec.config, client_id, _extra_rows(ClientDir(spec.client_dir(client_id)))),
    )


def _extra_rows(folder: ClientDir) -> str | None:
    """The client's extra training rows (an empirical audit's included canaries), if its folder holds any."""
    path = folder.extra_rows_path
    return str(path) if path.is_file() and path.stat().st_size > 0 else None


def client_for_profile(spec: RunSpec, context: Context) -> FedClient:
    """Deployment: the node's own profile, not the submitted run config, says who it is and what it may spend.

    The run config comes from whoever submitted the run; the profile is the institution's. Client id, data
    file, state directory, signing key and every privacy setting are the profile's, and a run that asks for
    any other privacy setting is refused here, before the node's data is read or any spend is planned.
    """
    faults.refuse_if_set("a deployed node")
    profile = load_profile(str(context.node_config[PROFILE_KEY]))
    profile.check_run(spec.config)
    split = profile.load_split(spec.config)
    return FedClient(
        config=spec.config,
        client_id=profile.id,
        state_dir=profile.state_dir,
        node_state=NodeState(context),
        run_id=spec.run_id or str(context.run_id),
        assets=assets_for(spec.config, split, len(spec.config.data.labels or ())),
        signing_key=profile.node_key,
        settings=profile.settings,
    )
