"""Scenario in, config object out (and back): scenario lookup, TOML reading, dotted overrides, typed building.

A scenario is data, not code, so a run can be reproduced from the ``config.toml`` it wrote: :func:`to_toml`
writes exactly what :func:`from_dict` reads back, and :func:`config_hash` names those settings in the ledger.
Every value is checked once, here (types) and in :mod:`fedllm.config.validation` (ranges and rules), with an
error that names the file and the field; nothing downstream re-validates.
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
from dataclasses import fields, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import tomli_w

from fedllm.config.schema import DEFAULT_SCENARIO, ClientConfig, FederationConfig
from fedllm.config.validation import validate
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


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved once per class: a config of 10,000 ``[[clients]]`` resolved the same annotations 10,000 times
    (4 s, paid again by every report that reloads the run's config)."""
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: expected a table")
    hints = _type_hints(cls)
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


@lru_cache(maxsize=8)
def config_hash(cfg: FederationConfig) -> str:
    """Identifies the exact settings of a run in the ledger; stable across processes.

    Cached (the config is frozen): every client a round builds asks for it, and serialising a config of
    10,000 ``[[clients]]`` to TOML costs about 1 s.
    """
    return hashlib.sha256(to_toml(cfg).encode()).hexdigest()
