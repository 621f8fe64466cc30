"""The scenario's schema: one frozen dataclass per TOML table, and the allowed values the validator checks.

Every field's trailing (or preceding) comment is its one-line meaning in docs/configuration.md
(:mod:`fedllm.config_reference` reads it from here), so a field and its documentation change together.
A config object is built and checked by :mod:`fedllm.config.load`; nothing here reads files.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from fedllm.errors import ConfigError

DEFAULT_SCENARIO = "hospitals"
MODES = ("lora", "last-layers", "full", "head", "head-lora")
ACCOUNTANTS = ("pld", "prv", "rdp")
HEAD_INITS = ("zeros", "label-names")


@dataclass(frozen=True)
class ModelConfig:
    """Which BERT-family checkpoint and which of its tensors are trained (and therefore travel)."""

    name: str = "minilm"  # minilm, tiny-bert, or a local checkpoint directory (BERT-family encoder)
    mode: str = "lora"  # which tensors train and travel: LoRA+head, last layers+head, all, head, head then LoRA
    max_length: int = 64  # tokens per text; longer texts are truncated (>= 8)
    lora_r: int = 8  # LoRA rank (>= 1)
    lora_alpha: int = 16  # LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)
    lora_targets: tuple[str, ...] | None = None  # LoRA's target modules; unset: the family's query/value
    last_layers: int = 1  # last-layers mode: how many of the last encoder blocks train (>= 1)
    head_hidden: int = 0  # head, head-lora: 0 = a linear head on the pooled features, else one hidden ReLU layer
    head_rounds: int = 0  # head-lora: the first rounds train the head alone on cached features, then LoRA too
    head_init: str = "zeros"  # head, head-lora: the linear head's start: zeros, or label-names (zero-shot, no cost)
    seed: int = 0  # the head's (and LoRA's) initial weights, identical on every node


@dataclass(frozen=True)
class DataConfig:
    """Where the federation's text comes from and how it is split (:mod:`fedllm.data`; the sources are listed
    in docs/configuration.md, *Data sources*)."""

    source: str = "medmcqa"  # where the text comes from (see Data sources below)
    text_column: str = "text"  # the column holding the text
    label_column: str = "label"  # the column holding the label
    labels: tuple[str, ...] | None = None  # the fixed label list, in logit order; unset: labels found, sorted
    keep_labels: tuple[str, ...] | None = None  # keep only rows with these labels; unset: all
    partition: str = "dirichlet"  # how rows are split among clients: iid, label-skewed, or one file each
    alpha: float = 0.5  # Dirichlet concentration: smaller is more skewed (dirichlet only)
    test_fraction: float = 0.2  # share of each client's rows kept as its local test split
    central_test_fraction: float = 0.1  # share held out for the coordinator's test set if none is given
    max_examples: int | None = None  # cap on training rows before partitioning (quick runs); unset: all
    max_central_test: int | None = 500  # cap on the central test set; unset: no cap
    min_partition_size: int = 10  # dirichlet: fewest rows each client must get
    central_test: str | None = None  # with source = "nodes": the coordinator's own test file, if it has one


@dataclass(frozen=True)
class TrainingConfig:
    """Local work per round. ``batch_size`` is the *expected* Poisson batch size under DP."""

    local_steps: int = 20  # DP-SGD steps each client takes per round (>= 1)
    batch_size: int = 32  # expected (Poisson) batch size; the sampling rate is batch_size / examples
    learning_rate: float = 5e-3  # the optimizer's learning rate (> 0)
    lora_learning_rate: float | None = None  # head-lora mode, once LoRA trains (> 0); unset: learning_rate
    eval_batch_size: int = 64  # batch size for evaluation only (no privacy effect)
    # Virtual steps: a Poisson batch larger than this is cut into chunks (summed, then one noisy step), so a
    # large logical batch runs at bounded memory. Head mode trains on feature vectors and never needs it.
    max_physical_batch: int = 64
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9); see fedllm/training.py
    device: str = "auto"  # where training runs: CUDA when present (auto), or forced; a missing GPU is an error


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD settings; per-client values in ``[[clients]]`` override these defaults."""

    enabled: bool = True  # false: the labelled non-private baseline (epsilon = infinity)
    epsilon: float = 8.0  # each client's total budget over all its runs (> 0)
    delta: float = 1e-5  # each client's delta; must be below 1 / its training examples
    max_grad_norm: float = 1.0  # per-example gradient clipping norm C (> 0)
    accountant: str = "pld"  # how the spent epsilon is computed (docs/privacy.md)
    noise_multiplier: float | None = None  # fixed sigma; unset: calibrated so the plan spends epsilon
    planned_rounds: int | None = None  # rounds the noise is calibrated for; unset: rounds


@dataclass(frozen=True)
class ClientConfig:
    """One institution. Unset fields fall back to ``[privacy]`` / ``[training]``; ``data`` is its own file.

    ``declared_examples`` is the public size a client's Poisson rate is fixed from (rate = batch_size /
    declared_examples): a deployed node declares it in its profile, so neither the rate, the noise, the
    epsilon nor the FedAvg weight moves with its true, private number of rows. Unset (simulation, where
    the coordinator made the partition), the client's actual count stands in.
    """

    id: str  # the client's unique name (its ledger, key and node)
    epsilon: float | None = None  # this client's budget; unset: privacy.epsilon
    delta: float | None = None  # this client's delta; unset: privacy.delta
    noise_multiplier: float | None = None  # this client's fixed sigma; unset: privacy.noise_multiplier
    planned_rounds: int | None = None  # rounds this client calibrates for; unset: privacy.planned_rounds
    local_steps: int | None = None  # this client's steps per round; unset: training.local_steps
    batch_size: int | None = None  # this client's expected batch size; unset: training.batch_size
    declared_examples: int | None = None  # public size the sampling rate is fixed from; unset: actual count
    data: str | None = None  # not read by simulate; a deployed node names its file in its profile


@dataclass(frozen=True)
class SimulationConfig:
    """Resources Flower's Ray backend reserves for each simulated client, and which Ray cluster runs them.

    A client trains on a GPU only when ``num_gpus`` > 0 reserves (a fraction of) one. ``ray_address``
    (``host:port`` of a running head, or ``auto``) joins that cluster; unset, the simulation starts a
    private Ray instance on this machine and stops it afterwards. A cluster it joined is never stopped.
    """

    num_cpus: float = 1.0  # CPUs Ray reserves per simulated client (> 0)
    num_gpus: float = 0.0  # GPUs (or a fraction) per simulated client; 0: clients train on CPU
    ray_address: str | None = None  # host:port or auto: join a running Ray cluster; unset: a private one


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ over update deltas: the coordinator learns only the weighted mean of the updates.

    ``clipping_range`` bounds each *value* of a delta (SecAgg+ quantizes +/- this range onto
    ``quantization_range`` steps); AdamW moves a value by about the learning rate per step, so 1.0 leaves
    a wide margin. ``max_weight`` is the largest example count a client may weigh in with; unset, the
    coordinator uses the largest client's count where it knows the partition (simulation), which keeps
    the grid fine. The modulus 2**46 leaves room for 65,536 clients per round.
    """

    enabled: bool = True  # mask updates with SecAgg+ (needs >= 2 clients per round)
    clipping_range: float = 1.0  # each value of an update delta is clipped to +/- this before quantizing
    max_weight: int | None = None  # largest example count a client weighs in with; unset: largest client
    quantization_range: int = 2**30  # quantization steps over the clipping range, in [2, 2**31)
    modulus_range: int = 2**46  # masking modulus: a power of 2 above quantization_range
    share_fraction: float = 1.0  # each client's secrets are shared with this fraction of the round's clients
    reconstruction_fraction: float = 0.6  # shares needed to unmask: more survive dropouts, fewer resist collusion
    timeout: float = 600.0  # seconds per protocol stage; late clients count as dropped
    min_peers: int = 1  # a client sends its masked update only if this many others shared keys with it


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """A one-run empirical privacy audit (``fedllm/audit/canaries.py``, ``docs/privacy.md``); off by default.

    ``canaries`` (m) random-label sentences are added to ``client``'s training data, each by a secret fair
    coin; after the run the adversary guesses k of them (``guesses``, else ``guess_fraction`` x m; a share
    ``in_share`` called "in", the rest "out") and the guesses become a lower bound on epsilon at
    ``confidence``. An audited run trains on extra rows, so it is a test run, not the production one.
    """

    enabled: bool = False  # run the one-run empirical audit (adds canaries: a test run, not production)
    client: str | None = None  # default: the first client
    canaries: int = 200  # m random-label canary sentences, each included by a secret coin (>= 2)
    adversary: str = "black-box"  # the attack that scores canaries (only the final model is used)
    guesses: int | None = None  # k canaries the adversary guesses on; unset: guess_fraction x m
    guess_fraction: float = 0.2  # share of canaries guessed when guesses is unset, in (0, 1]
    in_share: float = 0.5  # share of the guesses that say in (the rest say out), in [0, 1]
    confidence: float = 0.95  # confidence of the epsilon lower bound, in (0, 1)
    seed: int = 0  # the canary texts and labels (public); the coins come from the OS, never from here


@dataclass(frozen=True)
class ClientSettings:
    """One client's effective settings that touch privacy or leave its node: the set a node profile pins.

    In simulation they come from the scenario (a client's ``[[clients]]`` entry over the federation
    defaults). A deployed node takes them from its own profile and refuses a run that asks for any other
    value (:meth:`mismatches`), so whoever submits a run cannot change what a node spends or discloses.
    """

    enabled: bool
    epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: float | None
    planned_rounds: int
    local_steps: int
    batch_size: int
    declared_examples: int | None
    share_client_metrics: bool
    federated_evaluation: bool
    require_secure_aggregation: bool
    min_secagg_peers: int

    # Where each setting sits in a run config, for refusals that name the key.
    RUN_CONFIG_KEYS: typing.ClassVar[dict[str, str]] = {
        "enabled": "privacy.enabled",
        "epsilon": "privacy.epsilon",
        "delta": "privacy.delta",
        "accountant": "privacy.accountant",
        "max_grad_norm": "privacy.max_grad_norm",
        "noise_multiplier": "privacy.noise_multiplier",
        "planned_rounds": "privacy.planned_rounds",
        "local_steps": "training.local_steps",
        "batch_size": "training.batch_size",
        "declared_examples": "clients.declared_examples",
        "share_client_metrics": "share_client_metrics",
        "federated_evaluation": "federated_evaluation",
        "require_secure_aggregation": "secure_aggregation.enabled",
        "min_secagg_peers": "secure_aggregation.min_peers",
    }

    def mismatches(self, requested: ClientSettings) -> list[tuple[str, Any, Any]]:
        """(run-config key, this side's value, the requested value) for every setting that differs."""
        return [
            (self.RUN_CONFIG_KEYS[f.name], getattr(self, f.name), getattr(requested, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(requested, f.name)
        ]


_PER_PROCESS = ("_hash", "_clients_by_id")  # FederationConfig caches that never travel


@dataclass(frozen=True)
class FederationConfig:
    name: str = DEFAULT_SCENARIO  # the scenario's name: labels the run, its reports and default output folder
    rounds: int = 3  # federated rounds to run (>= 1)
    num_clients: int = 3  # clients in the federation; unlisted ones get ids client-0, client-1, ...
    clients_per_round: int | None = None  # clients sampled each round (1..num_clients); unset: all
    min_clients: int = 1  # fewest updates a round aggregates; fewer and the run stops early
    seed: int = 0  # data partition and held-out splits (model weights use model.seed; DP noise never)
    federated_evaluation: bool = False  # clients also report accuracy on their own test split (in clear)
    share_client_metrics: bool = False  # clients also report their local training loss (in clear)
    max_update_norm: float | None = None  # coordinator rejects updates that move the model further (L2)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    empirical_audit: EmpiricalAuditConfig = field(default_factory=EmpiricalAuditConfig)
    clients: tuple[ClientConfig, ...] = ()

    def __hash__(self) -> int:
        """The dataclass' hash of all fields, worked out once per object (equality is still field by field).

        The frozen config keys the per-process caches (``config_hash``, a node's assets): recomputed, the hash
        of 10,000 ``[[clients]]`` entries cost 3-13 ms per look-up, twice per sampled client per round.
        """
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without what each process works out for itself: a str's hash differs between processes
        (hash randomisation), so a cached hash must never travel; the id index is rebuilt on first use."""
        return {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}

    @property
    def client_ids(self) -> list[str]:
        return [c.id for c in self.clients]

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    @cached_property
    def _clients_by_id(self) -> dict[str, ClientConfig]:
        """Built on first use: a scan per look-up made checking 10,000 clients' settings quadratic (minutes)."""
        return {c.id: c for c in reversed(self.clients)}  # reversed: the first of equal ids wins, as a scan did

    def client(self, client_id: str) -> ClientConfig:
        found = self._clients_by_id.get(client_id)
        if found is None:
            raise ConfigError(f"clients: no client with id '{client_id}'")
        return found

    def client_settings(self, client_id: str) -> ClientSettings:
        """Everything this run asks of one client that touches privacy or leaves its node.

        The one place a client's effective settings are worked out: its own ``[[clients]]`` entries over the
        federation defaults (``[privacy]``, ``[training]``, ``rounds``). Whatever spends, plans, reports or
        audits a client's budget reads it from here, so they can never disagree on what the client was asked.
        """
        c, p = self.client(client_id), self.privacy

        def own(value: Any, default: Any) -> Any:
            return default if value is None else value

        return ClientSettings(
            enabled=p.enabled,
            epsilon=own(c.epsilon, p.epsilon),
            delta=own(c.delta, p.delta),
            accountant=p.accountant,
            max_grad_norm=p.max_grad_norm,
            noise_multiplier=own(c.noise_multiplier, p.noise_multiplier),
            planned_rounds=own(c.planned_rounds, p.planned_rounds) or self.rounds,
            local_steps=c.local_steps or self.training.local_steps,
            batch_size=c.batch_size or self.training.batch_size,
            declared_examples=c.declared_examples,
            share_client_metrics=self.share_client_metrics,
            federated_evaluation=self.federated_evaluation,
            require_secure_aggregation=self.secure_aggregation.enabled,
            min_secagg_peers=self.secure_aggregation.min_peers,
        )

    @property
    def planned_rounds_default(self) -> int:
        return self.privacy.planned_rounds or self.rounds
