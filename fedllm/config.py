"""The federation's configuration: one typed, validated object resolved from a scenario TOML and flags.

A scenario is data, not code, so a run can be reproduced from the ``config.toml`` it wrote. Every value is
checked here, once, with an error that names the file and the field; nothing downstream re-validates.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

SCENARIO_DIR = PROJECT_ROOT / "simulations"
DEFAULT_SCENARIO = "hospitals"
MODES = ("lora", "last-layers", "full")
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class ModelConfig:
    """Which BERT-family checkpoint and which of its tensors are trained (and therefore travel)."""

    name: str = "minilm"
    mode: str = "lora"
    max_length: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    last_layers: int = 1
    seed: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    """Local work per round. ``batch_size`` is the *expected* Poisson batch size under DP."""

    local_steps: int = 20
    batch_size: int = 32
    learning_rate: float = 5e-3
    eval_batch_size: int = 64
    device: str = "auto"


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD settings; per-client values in ``[[clients]]`` override these defaults."""

    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    noise_multiplier: float | None = None
    planned_rounds: int | None = None


@dataclass(frozen=True)
class ClientConfig:
    """One institution. Unset privacy fields fall back to ``[privacy]``; ``data`` is its own file, if any."""

    id: str
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    planned_rounds: int | None = None
    data: str | None = None


@dataclass(frozen=True)
class SimulationConfig:
    """Resources Flower's Ray backend reserves for each simulated client."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ over update deltas: the coordinator learns only the weighted mean of the updates.

    ``clipping_range`` bounds each *value* of a delta (SecAgg+ quantizes +/- this range onto
    ``quantization_range`` steps); AdamW moves a value by about the learning rate per step, so 1.0 leaves
    a wide margin. ``max_weight`` is the largest example count a client may weigh in with; unset, the
    coordinator uses the largest client's count where it knows the partition (simulation), which keeps
    the grid fine. The modulus 2**46 leaves room for 65,536 clients per round.
    """

    enabled: bool = True
    clipping_range: float = 1.0
    max_weight: int | None = None
    quantization_range: int = 2**30
    modulus_range: int = 2**46
    share_fraction: float = 1.0  # each client's secrets are shared with this fraction of the round's clients
    reconstruction_fraction: float = 0.6  # shares needed to unmask: more survive dropouts, fewer resist collusion
    timeout: float = 600.0  # seconds per protocol stage; late clients count as dropped


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """A one-run empirical privacy audit (``fedllm/empirical.py``, ``docs/privacy.md``); off by default.

    ``canaries`` (m) random-label sentences are added to ``client``'s training data, each by a secret fair
    coin; after the run the adversary guesses k of them (``guesses``, else ``guess_fraction`` x m; a share
    ``in_share`` called "in", the rest "out") and the guesses become a lower bound on epsilon at
    ``confidence``. An audited run trains on extra rows, so it is a test run, not the production one.
    """

    enabled: bool = False
    client: str | None = None  # default: the first client
    canaries: int = 200
    adversary: str = "black-box"
    guesses: int | None = None
    guess_fraction: float = 0.2
    in_share: float = 0.5
    confidence: float = 0.95
    seed: int = 0  # the canary texts and labels (public); the coins come from the OS, never from here


@dataclass(frozen=True)
class FederationConfig:
    name: str = DEFAULT_SCENARIO
    rounds: int = 3
    num_clients: int = 3
    clients_per_round: int | None = None
    min_clients: int = 1
    seed: int = 0
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
    _check(m.last_layers >= 1, source, "model.last_layers", "must be >= 1", m.last_layers)
    _check(t.local_steps >= 1, source, "training.local_steps", "must be >= 1", t.local_steps)
    _check(t.batch_size >= 1, source, "training.batch_size", "must be >= 1", t.batch_size)
    _check(t.learning_rate > 0, source, "training.learning_rate", "must be > 0", t.learning_rate)
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
    _validate_secure_aggregation(cfg, source)
    _validate_empirical_audit(cfg, source)
    seen: set[str] = set()
    for i, c in enumerate(cfg.clients):
        _check(bool(c.id.strip()), source, f"clients[{i}].id", "must not be empty", c.id)
        _check(c.id not in seen, source, f"clients[{i}].id", "duplicate client id", c.id)
        seen.add(c.id)
        _validate_privacy_values(c, source, f"clients[{i}].")


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
