"""The rules a scenario's values must follow, beyond their types: ranges, choices and rules that span fields.

Data-dependent rules (delta below 1 / a client's rows, labels present in the data) are checked where the data
is loaded (:mod:`fedllm.data.federation`); everything here needs only the config.
"""

from __future__ import annotations

from typing import Any

from fedllm.config.schema import ACCOUNTANTS, HEAD_INITS, MODES, FederationConfig
from fedllm.errors import ConfigError


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
    _check(m.head_rounds >= 0, source, "model.head_rounds", "must be >= 0", m.head_rounds)
    if m.mode == "head-lora":
        _check(m.head_rounds >= 1, source, "model.head_rounds", "must be >= 1 in head-lora mode", m.head_rounds)
    _check(m.head_init in HEAD_INITS, source, "model.head_init", f"must be one of {', '.join(HEAD_INITS)}", m.head_init)
    if m.head_init != "zeros":
        _check(
            m.mode in ("head", "head-lora") and m.head_hidden == 0,
            source,
            "model.head_init",
            "label-names needs a linear head on pooled features (mode head or head-lora, head_hidden = 0)",
            m.head_init,
        )
    if t.lora_learning_rate is not None:
        _check(t.lora_learning_rate > 0, source, "training.lora_learning_rate", "must be > 0", t.lora_learning_rate)
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
