"""The federation's configuration: one typed, validated object resolved from a scenario TOML and flags.

A scenario is data, not code, so a run can be reproduced from the ``config.toml`` it wrote. Every value is
checked here, once, with an error that names the file and the field; nothing downstream re-validates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from fedllm.data import DataConfig
from fedllm.errors import ConfigError
from fedllm.paths import PROJECT_ROOT


def _scenario_dir() -> Path:
    """Built-in scenarios: package data ``fedllm.scenarios`` in any install (wheel or editable), which
    pyproject.toml maps to the checkout's ``simulations/``; that folder itself where fedllm runs uninstalled."""
    try:
        return Path(str(importlib.resources.files("fedllm.scenarios")))
    except ModuleNotFoundError:
        return PROJECT_ROOT / "simulations"


SCENARIO_DIR = _scenario_dir()
DEFAULT_SCENARIO = "hospitals"
MODES = ("lora", "last-layers", "full", "head")
ACCOUNTANTS = ("pld", "prv", "rdp")


@dataclass(frozen=True)
class ModelConfig:
    """Which BERT-family checkpoint and which of its tensors are trained (and therefore travel)."""

    name: str = "minilm"  # minilm, tiny-bert, or a local checkpoint directory (BERT-family encoder)
    mode: str = "lora"  # which tensors train and travel: LoRA+head, last layers+head, all, or head only
    max_length: int = 64  # tokens per text; longer texts are truncated (>= 8)
    lora_r: int = 8  # LoRA rank (>= 1)
    lora_alpha: int = 16  # LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)
    lora_targets: tuple[str, ...] | None = None  # LoRA's target modules; unset: the family's query/value
    last_layers: int = 1  # last-layers mode: how many of the last encoder blocks train (>= 1)
    head_hidden: int = 0  # head mode: 0 = a linear head on the frozen features, else one hidden ReLU layer
    seed: int = 0  # the head's (and LoRA's) initial weights, identical on every node


@dataclass(frozen=True)
class TrainingConfig:
    """Local work per round. ``batch_size`` is the *expected* Poisson batch size under DP."""

    local_steps: int = 20  # DP-SGD steps each client takes per round (>= 1)
    batch_size: int = 32  # expected (Poisson) batch size; the sampling rate is batch_size / examples
    learning_rate: float = 5e-3  # AdamW learning rate (> 0)
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
    """A one-run empirical privacy audit (``fedllm/empirical.py``, ``docs/privacy.md``); off by default.

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

    @property
    def client_ids(self) -> list[str]:
        return [c.id for c in self.clients]

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    def client(self, client_id: str) -> ClientConfig:
        for c in self.clients:
            if c.id == client_id:
                return c
        raise ConfigError(f"clients: no client with id '{client_id}'")

    def client_privacy(self, client_id: str) -> PrivacyConfig:
        """The privacy settings one client enforces: its own entries over the federation defaults."""
        c = self.client(client_id)
        overrides = {
            k: getattr(c, k)
            for k in ("epsilon", "delta", "noise_multiplier", "planned_rounds")
            if getattr(c, k) is not None
        }
        return replace(self.privacy, **overrides)

    def client_settings(self, client_id: str) -> ClientSettings:
        """Everything this run asks of one client that touches privacy or leaves its node."""
        c, p = self.client(client_id), self.client_privacy(client_id)
        return ClientSettings(
            enabled=p.enabled,
            epsilon=p.epsilon,
            delta=p.delta,
            accountant=p.accountant,
            max_grad_norm=p.max_grad_norm,
            noise_multiplier=p.noise_multiplier,
            planned_rounds=p.planned_rounds or self.rounds,
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


# ---------------------------------------------------------------------------------------------- loading


def scenario_path(name_or_path: str) -> Path:
    """A scenario is a TOML path or the name of one in ``simulations/``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: scenario file not found")
        return path
    candidate = SCENARIO_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
        raise ConfigError(f"scenario '{name_or_path}' not found (built-in: {', '.join(known)}; or give a .toml path)")
    return candidate


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def load_config(
    scenario: str | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[FederationConfig, Path]:
    """Resolve a scenario plus dotted-key overrides (``{"privacy.epsilon": 3}``) into a validated config."""
    path = scenario_path(scenario or DEFAULT_SCENARIO)
    raw = read_toml(path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return from_dict(raw, source=str(path)), path


def from_dict(raw: Mapping[str, Any], source: str = "config") -> FederationConfig:
    cfg = _build(FederationConfig, raw, source, "")
    cfg = _complete_clients(cfg)
    validate(cfg, source)
    return cfg


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _complete_clients(cfg: FederationConfig) -> FederationConfig:
    """``num_clients`` decides the count: listed clients are kept in order, missing ones get generated ids."""
    listed = list(cfg.clients[: cfg.num_clients])
    taken = {c.id for c in listed}
    k = 0
    while len(listed) < cfg.num_clients:
        cid = f"client-{k}"
        k += 1
        if cid not in taken:
            listed.append(ClientConfig(id=cid))
    return replace(cfg, clients=tuple(listed))


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return True, None
        for arg in typing.get_args(hint):
            if arg is not type(None):
                ok, conv = _type_ok(value, arg)
                if ok:
                    return True, conv
        return False, None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, None
        (inner, *_rest) = typing.get_args(hint)
        out = []
        for item in value:
            ok, conv = _type_ok(item, inner)
            if not ok:
                return False, None
            out.append(conv)
        return True, tuple(out)
    if hint is float:  # NaN and infinity are never meaningful settings (an infinite epsilon is no budget)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return ok, (float(value) if ok else None)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    return True, value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {prefix}{f.name}: required")
            continue
        value, hint, name = raw[f.name], hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, source, f"{name}.")
        elif hint == tuple[ClientConfig, ...]:
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {name}: expected an array of tables [[clients]]")
            kwargs[f.name] = tuple(_build(ClientConfig, v, source, f"{name}[{i}].") for i, v in enumerate(value))
        else:
            ok, conv = _type_ok(value, hint)
            if not ok:
                raise ConfigError(f"{source}: {name}: expected {_hint_name(hint)}, got {value!r}")
            kwargs[f.name] = conv
    return cls(**kwargs)


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check(ok: bool, source: str, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{source}: {name}: {rule}, got {value!r}")


def _validate_privacy_values(p: Any, source: str, prefix: str) -> None:
    if p.epsilon is not None:
        _check(p.epsilon > 0, source, f"{prefix}epsilon", "must be > 0", p.epsilon)
    if p.delta is not None:
        _check(0 < p.delta < 1, source, f"{prefix}delta", "must be in (0, 1)", p.delta)
    if p.noise_multiplier is not None:
        _check(p.noise_multiplier > 0, source, f"{prefix}noise_multiplier", "must be > 0", p.noise_multiplier)
    if p.planned_rounds is not None:
        _check(p.planned_rounds >= 1, source, f"{prefix}planned_rounds", "must be >= 1", p.planned_rounds)


def validate(cfg: FederationConfig, source: str = "config") -> None:
    """Rules that span fields; data-dependent ones (delta < 1/n) are checked where the data is loaded."""
    _check(cfg.rounds >= 1, source, "rounds", "must be >= 1", cfg.rounds)
    _check(cfg.num_clients >= 1, source, "num_clients", "must be >= 1", cfg.num_clients)
    if cfg.clients_per_round is not None:
        _check(
            1 <= cfg.clients_per_round <= cfg.num_clients,
            source,
            "clients_per_round",
            f"must be between 1 and num_clients ({cfg.num_clients})",
            cfg.clients_per_round,
        )
    _check(
        1 <= cfg.min_clients <= cfg.sampled_per_round,
        source,
        "min_clients",
        f"must be between 1 and the clients sampled per round ({cfg.sampled_per_round})",
        cfg.min_clients,
    )
    m, t, p = cfg.model, cfg.training, cfg.privacy
    _check(m.mode in MODES, source, "model.mode", f"must be one of {', '.join(MODES)}", m.mode)
    _check(m.max_length >= 8, source, "model.max_length", "must be >= 8", m.max_length)
    _check(m.lora_r >= 1, source, "model.lora_r", "must be >= 1", m.lora_r)
    if m.lora_targets is not None:
        _check(
            bool(m.lora_targets) and all(t.strip() for t in m.lora_targets),
            source,
            "model.lora_targets",
            "must name at least one module, none empty",
            m.lora_targets,
        )
    _check(m.last_layers >= 1, source, "model.last_layers", "must be >= 1", m.last_layers)
    _check(m.head_hidden >= 0, source, "model.head_hidden", "must be >= 0", m.head_hidden)
    _check(t.local_steps >= 1, source, "training.local_steps", "must be >= 1", t.local_steps)
    _check(t.batch_size >= 1, source, "training.batch_size", "must be >= 1", t.batch_size)
    _check(t.learning_rate > 0, source, "training.learning_rate", "must be > 0", t.learning_rate)
    _check(t.optimizer in ("adamw", "sgd"), source, "training.optimizer", "must be adamw or sgd", t.optimizer)
    _check(t.max_physical_batch >= 1, source, "training.max_physical_batch", "must be >= 1", t.max_physical_batch)
    _check(t.eval_batch_size >= 1, source, "training.eval_batch_size", "must be >= 1", t.eval_batch_size)
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        source,
        "training.device",
        "must be auto, cpu or cuda[:N]",
        t.device,
    )
    _validate_privacy_values(p, source, "privacy.")
    _check(p.max_grad_norm > 0, source, "privacy.max_grad_norm", "must be > 0", p.max_grad_norm)
    _check(
        p.accountant in ACCOUNTANTS,
        source,
        "privacy.accountant",
        f"must be one of {', '.join(ACCOUNTANTS)}",
        p.accountant,
    )
    if cfg.max_update_norm is not None:
        _check(cfg.max_update_norm > 0, source, "max_update_norm", "must be > 0", cfg.max_update_norm)
    _check(cfg.simulation.num_cpus > 0, source, "simulation.num_cpus", "must be > 0", cfg.simulation.num_cpus)
    _check(cfg.simulation.num_gpus >= 0, source, "simulation.num_gpus", "must be >= 0", cfg.simulation.num_gpus)
    _check(
        cfg.simulation.ray_address is None or bool(cfg.simulation.ray_address.strip()),
        source,
        "simulation.ray_address",
        "must be host:port or auto",
        cfg.simulation.ray_address,
    )
    _validate_secure_aggregation(cfg, source)
    _validate_empirical_audit(cfg, source)
    seen: set[str] = set()
    for i, c in enumerate(cfg.clients):
        _check(bool(c.id.strip()), source, f"clients[{i}].id", "must not be empty", c.id)
        _check(c.id not in seen, source, f"clients[{i}].id", "duplicate client id", c.id)
        seen.add(c.id)
        _validate_privacy_values(c, source, f"clients[{i}].")
        for name in ("local_steps", "batch_size", "declared_examples"):
            value = getattr(c, name)
            if value is not None:
                _check(value >= 1, source, f"clients[{i}].{name}", "must be >= 1", value)


def _validate_secure_aggregation(cfg: FederationConfig, source: str) -> None:
    s = cfg.secure_aggregation
    if not s.enabled:
        return
    _check(
        cfg.sampled_per_round >= 2,
        source,
        "secure_aggregation.enabled",
        "needs at least 2 clients per round (a sum of one update is that update); set it to false to run"
        f" with {cfg.sampled_per_round}",
        s.enabled,
    )
    p = "secure_aggregation."
    _check(s.clipping_range > 0, source, f"{p}clipping_range", "must be > 0", s.clipping_range)
    if s.max_weight is not None:
        _check(s.max_weight >= 1, source, f"{p}max_weight", "must be >= 1", s.max_weight)
    _check(
        2 <= s.quantization_range < 2**31,
        source,
        f"{p}quantization_range",
        "must be in [2, 2**31) (Flower quantizes to int32)",
        s.quantization_range,
    )
    _check(
        s.modulus_range > s.quantization_range and s.modulus_range & (s.modulus_range - 1) == 0,
        source,
        f"{p}modulus_range",
        "must be a power of 2 larger than quantization_range",
        s.modulus_range,
    )
    _check(
        s.modulus_range <= 2**62 // max(cfg.sampled_per_round, 2),
        source,
        f"{p}modulus_range",
        "too large: the masked sum over the round's clients would overflow 64-bit integers",
        s.modulus_range,
    )
    _check(0 < s.share_fraction <= 1, source, f"{p}share_fraction", "must be in (0, 1]", s.share_fraction)
    _check(
        0 < s.reconstruction_fraction <= 1,
        source,
        f"{p}reconstruction_fraction",
        "must be in (0, 1]",
        s.reconstruction_fraction,
    )
    _check(s.timeout > 0, source, f"{p}timeout", "must be > 0", s.timeout)
    _check(s.min_peers >= 1, source, f"{p}min_peers", "must be >= 1 (a sum needs two updates)", s.min_peers)


def _validate_empirical_audit(cfg: FederationConfig, source: str) -> None:
    a, p = cfg.empirical_audit, "empirical_audit."
    _check(a.canaries >= 2, source, f"{p}canaries", "must be >= 2", a.canaries)
    _check(
        a.adversary == "black-box",
        source,
        f"{p}adversary",
        "must be 'black-box' (a white-box adversary, scoring the client's own updates, is not implemented:"
        " docs/privacy.md)",
        a.adversary,
    )
    if a.guesses is not None:
        _check(1 <= a.guesses <= a.canaries, source, f"{p}guesses", "must be between 1 and canaries", a.guesses)
    _check(0 < a.guess_fraction <= 1, source, f"{p}guess_fraction", "must be in (0, 1]", a.guess_fraction)
    _check(0 <= a.in_share <= 1, source, f"{p}in_share", "must be in [0, 1]", a.in_share)
    _check(0 < a.confidence < 1, source, f"{p}confidence", "must be in (0, 1)", a.confidence)
    if a.client is not None:
        ids = [c.id for c in cfg.clients]
        _check(a.client in ids, source, f"{p}client", f"must be one of the clients ({', '.join(ids)})", a.client)


# ---------------------------------------------------------------------------------------------- writing


def to_dict(cfg: FederationConfig) -> dict[str, Any]:
    """Plain TOML-ready data: ``None`` values are dropped because TOML has no null."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(cfg))


def to_toml(cfg: FederationConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def config_hash(cfg: FederationConfig) -> str:
    """Identifies the exact settings of a run in the ledger; stable across processes."""
    return hashlib.sha256(to_toml(cfg).encode()).hexdigest()
