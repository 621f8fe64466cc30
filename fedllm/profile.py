"""An institution's node profile: who it is, what data it holds, what it may spend, where its keys live.

In deployment each institution runs its own SuperNode with a profile file of its own. The profile is the
institution's word, not the coordinator's: a run's configuration arrives over the network from whoever
submitted the run, so the client id, data, privacy budget and state directory a node enforces come from the
profile, and :meth:`NodeProfile.apply_to` writes them over the run's entry for this client.

Relative paths are relative to the profile file; ``${VAR}`` and ``~`` are expanded first, so a profile can
name shared data as ``${FEDLLM_SHARED}/data/...``. Every error names the file and the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedllm.config import FederationConfig, read_toml
from fedllm.data import ClientSplit, load_client_file
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
    },
    "privacy": {
        "epsilon": (float, True),
        "delta": (float, True),
        "planned_rounds": (int, False),
        "require_secure_aggregation": (bool, False),
    },
    "node": {"key": (str, True), "ca": (str, True), "state_dir": (str, True), "superlink": (str, False)},
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
    epsilon: float
    delta: float
    planned_rounds: int | None
    node_key: Path
    ca: Path
    state_dir: Path
    superlink: str | None
    require_secure_aggregation: bool = True  # the node refuses to send its update unmasked

    def apply_to(self, config: FederationConfig) -> FederationConfig:
        """The run's config with this client's budget replaced by the profile's (the coordinator cannot raise it).

        Only values that differ are written, so a run whose config already agrees with the profile keeps its
        exact config hash. A profile whose id the run does not list is refused: the run's ``[[clients]]`` is
        the consortium's member list.
        """
        if self.id not in config.client_ids:
            raise ConfigError(
                f"{self.source}: institution.id: '{self.id}' is not among this run's clients"
                f" ({', '.join(config.client_ids)})"
            )
        current = config.client_privacy(self.id)
        wanted = {"epsilon": self.epsilon, "delta": self.delta}
        if self.planned_rounds is not None:
            wanted["planned_rounds"] = self.planned_rounds
        changes = {k: v for k, v in wanted.items() if getattr(current, k) != v}
        if not changes:
            return config
        clients = tuple(replace(c, **changes) if c.id == self.id else c for c in config.clients)
        return replace(config, clients=clients)

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
    if values["privacy.planned_rounds"] is not None:
        check(values["privacy.planned_rounds"] >= 1, "privacy.planned_rounds", "must be >= 1")
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
        epsilon=values["privacy.epsilon"],
        delta=values["privacy.delta"],
        planned_rounds=values["privacy.planned_rounds"],
        node_key=paths["node.key"],
        ca=paths["node.ca"],
        state_dir=paths["node.state_dir"],
        superlink=values["node.superlink"],
        require_secure_aggregation=values["privacy.require_secure_aggregation"] is not False,
    )
