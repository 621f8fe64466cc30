"""An institution's node profile: who it is, what data it holds, what it may spend, where its keys live.

In deployment each institution runs its own SuperNode with a profile file of its own. The profile is the
institution's word, not the coordinator's: a run's configuration arrives over the network from whoever
submitted the run. Every setting that touches privacy or leaves the node (DP on, budget, accountant,
noise, sampling, local steps, batch size, clipping, planned rounds, metric sharing, federated evaluation,
secure aggregation and its minimum peers) is the profile's; :meth:`NodeProfile.check_run` refuses a run
that asks for any other value, naming the key, the node's value and the requested one. Nothing is
silently applied and nothing silently overridden.

Relative paths are relative to the profile file; ``${VAR}`` and ``~`` are expanded first, so a profile can
name shared data as ``${FEDLLM_SHARED}/data/...``. Every error names the file and the field.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import ACCOUNTANTS, ClientSettings, FederationConfig, read_toml
from fedllm.data.federation import load_client_file
from fedllm.data.records import ClientSplit
from fedllm.errors import ConfigError

NODE_CONFIG_KEY = "profile"  # the --node-config key that carries the profile's absolute path

_SECTIONS: dict[str, dict[str, tuple[type, bool]]] = {
    # section -> field -> (type, required)
    "institution": {"id": (str, True), "name": (str, False)},
    "data": {
        "path": (str, True),
        "text_column": (str, False),
        "label_column": (str, False),
        "test_fraction": (float, False),
        "declared_examples": (int, True),
    },
    "privacy": {
        "epsilon": (float, True),
        "delta": (float, True),
        "planned_rounds": (int, True),
        "enabled": (bool, False),
        "accountant": (str, False),
        "max_grad_norm": (float, False),
        "noise_multiplier": (float, False),
        "require_secure_aggregation": (bool, False),
        "min_secagg_peers": (int, False),
        "share_client_metrics": (bool, False),
        "federated_evaluation": (bool, False),
    },
    "training": {"local_steps": (int, True), "batch_size": (int, True)},
    "node": {
        "key": (str, True),
        "ca": (str, True),
        "state_dir": (str, True),
        "superlink": (str, False),
        "allowed_bundles": (list, False),
    },
}


@dataclass(frozen=True)
class NodeProfile:
    source: Path
    id: str
    name: str
    data: Path
    text_column: str
    label_column: str
    test_fraction: float | None
    settings: ClientSettings  # every privacy setting this node enforces
    node_key: Path
    ca: Path
    state_dir: Path
    superlink: str | None
    allowed_bundles: tuple[str, ...] = ()  # app bundle hashes this node accepts besides its own fedllm

    @property
    def epsilon(self) -> float:
        return self.settings.epsilon

    @property
    def require_secure_aggregation(self) -> bool:
        return self.settings.require_secure_aggregation

    def check_run(self, config: FederationConfig) -> None:
        """Refuse a run that is not for this institution or asks for any privacy setting but the profile's.

        The run's ``[[clients]]`` is the consortium's member list, so an id it does not list is refused too.
        The message names the first differing key, the node's value and the requested one (all of them, if
        several differ), so an operator can see at once what the submitter asked for.
        """
        if self.id not in config.client_ids:
            raise ConfigError(
                f"{self.source}: institution.id: '{self.id}' is not among this run's clients"
                f" ({', '.join(config.client_ids)})"
            )
        differing = self.settings.mismatches(config.client_settings(self.id))
        if differing:
            asked = "; ".join(
                f"{key} = {_show(requested)} (this node: {_show(own)})" for key, own, requested in differing
            )
            raise ConfigError(
                f"{self.source}: node '{self.id}' refuses the run: it asks {asked}; the node's profile is authoritative"
            )

    def load_split(self, config: FederationConfig) -> ClientSplit:
        """This node's own file, checked against the run's fixed label space and split train/test locally."""
        labels = config.data.labels
        if labels is None:
            raise ConfigError(
                "data.labels: a deployed run must fix the label space (the coordinator holds no client data)"
            )
        fraction = self.test_fraction if self.test_fraction is not None else config.data.test_fraction
        return load_client_file(
            self.data, self.text_column, self.label_column, labels, fraction, seed=config.seed, client_id=self.id
        )


def resolve_path(text: str, base: Path) -> Path:
    """``${VAR}`` and ``~`` expanded, then relative to ``base`` (the profile's folder); an unset VAR is an error."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    if "$" in expanded:
        raise ValueError(f"unset environment variable in {text!r}")
    path = Path(expanded)
    return (path if path.is_absolute() else base / path).resolve()


def _field(raw: dict[str, Any], source: Path, section: str, name: str, kind: type, required: bool) -> Any:
    where = f"{source}: {section}.{name}"
    if name not in raw:
        if required:
            raise ConfigError(f"{where}: required")
        return None
    value = raw[name]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is list:
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str) and bool(value.strip())
    if not ok:
        raise ConfigError(f"{where}: expected {'a non-empty string' if kind is str else kind.__name__}, got {value!r}")
    return value


def load_profile(path: str | os.PathLike[str]) -> NodeProfile:
    """Read and validate a profile; the data file itself is read later, when the node first trains."""
    source = Path(path).expanduser().resolve()
    raw = read_toml(source)
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown section (known: {', '.join(_SECTIONS)})")
    values: dict[str, Any] = {}
    for section, spec in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section}: expected a table [{section}]")
        extra = sorted(set(table) - set(spec))
        if extra:
            raise ConfigError(f"{source}: {section}.{extra[0]}: unknown key (known: {', '.join(spec)})")
        for name, (kind, required) in spec.items():
            values[f"{section}.{name}"] = _field(table, source, section, name, kind, required)

    def check(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {name}: {rule}, got {values[name]!r}")

    check(values["privacy.epsilon"] > 0, "privacy.epsilon", "must be > 0")
    check(0 < values["privacy.delta"] < 1, "privacy.delta", "must be in (0, 1)")
    check(values["privacy.planned_rounds"] >= 1, "privacy.planned_rounds", "must be >= 1")
    for name in ("data.declared_examples", "training.local_steps", "training.batch_size"):
        check(values[name] >= 1, name, "must be >= 1")
    check(
        values["privacy.delta"] < 1 / values["data.declared_examples"],
        "privacy.delta",
        f"must be < 1/data.declared_examples = 1/{values['data.declared_examples']}",
    )
    if values["privacy.accountant"] is not None:
        check(values["privacy.accountant"] in ACCOUNTANTS, "privacy.accountant", f"must be one of {ACCOUNTANTS}")
    for name in ("privacy.max_grad_norm", "privacy.noise_multiplier"):
        if values[name] is not None:
            check(values[name] > 0, name, "must be > 0")
    if values["privacy.min_secagg_peers"] is not None:
        check(values["privacy.min_secagg_peers"] >= 1, "privacy.min_secagg_peers", "must be >= 1")
    bundles = values["node.allowed_bundles"] or []
    check(
        all(isinstance(b, str) and re.fullmatch(r"[0-9a-fA-F]{64}", b) for b in bundles),
        "node.allowed_bundles",
        "must be a list of sha256 hashes (64 hex digits)",
    )
    if values["data.test_fraction"] is not None:
        check(0 <= values["data.test_fraction"] < 1, "data.test_fraction", "must be in [0, 1)")
    check("/" not in values["institution.id"], "institution.id", "must not contain '/'")

    paths: dict[str, Path] = {}
    for name in ("data.path", "node.key", "node.ca", "node.state_dir"):
        try:
            paths[name] = resolve_path(values[name], source.parent)
        except ValueError as exc:
            raise ConfigError(f"{source}: {name}: {exc}") from None
    for name in ("data.path", "node.key", "node.ca"):
        if not paths[name].is_file():
            raise ConfigError(f"{source}: {name}: no such file {paths[name]}")
    if paths["node.state_dir"].exists() and not paths["node.state_dir"].is_dir():
        raise ConfigError(f"{source}: node.state_dir: {paths['node.state_dir']} is not a directory")
    return NodeProfile(
        source=source,
        id=values["institution.id"],
        name=values["institution.name"] or values["institution.id"],
        data=paths["data.path"],
        text_column=values["data.text_column"] or "text",
        label_column=values["data.label_column"] or "label",
        test_fraction=values["data.test_fraction"],
        settings=ClientSettings(
            enabled=_default(values["privacy.enabled"], True),
            epsilon=values["privacy.epsilon"],
            delta=values["privacy.delta"],
            accountant=_default(values["privacy.accountant"], "pld"),
            max_grad_norm=_default(values["privacy.max_grad_norm"], 1.0),
            noise_multiplier=values["privacy.noise_multiplier"],
            planned_rounds=values["privacy.planned_rounds"],
            local_steps=values["training.local_steps"],
            batch_size=values["training.batch_size"],
            declared_examples=values["data.declared_examples"],
            share_client_metrics=_default(values["privacy.share_client_metrics"], False),
            federated_evaluation=_default(values["privacy.federated_evaluation"], False),
            require_secure_aggregation=_default(values["privacy.require_secure_aggregation"], True),
            min_secagg_peers=_default(values["privacy.min_secagg_peers"], 1),
        ),
        node_key=paths["node.key"],
        ca=paths["node.ca"],
        state_dir=paths["node.state_dir"],
        superlink=values["node.superlink"],
        allowed_bundles=tuple(b.lower() for b in bundles),
    )


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _show(value: Any) -> str:
    """A value as a run config would spell it: true/false, numbers as written, unset as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
