"""What both apps need to know about a run: the resolved config and where its records live.

``fedllm simulate`` resolves the config once and hands the same object to the ServerApp and every
ClientApp. Under ``flwr run`` the apps rebuild it from Flower's ``run_config`` (pyproject's
``[tool.flwr.app.config]`` plus ``--run-config`` overrides), by the same function.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedllm.config import FederationConfig, from_dict, load_config, read_toml
from fedllm.data import DataConfig, FederatedData, load_federated
from fedllm.errors import ConfigError
from fedllm.paths import shared_data_dir

SPECIAL_KEYS = ("scenario", "out-dir", "config-file", "config-toml", "transport")
IN_PROCESS = "in-process"  # simulation: no network between the apps


@dataclass(frozen=True)
class RunSpec:
    config: FederationConfig
    out_dir: Path
    resume: bool = False  # continue the run recorded in out_dir from its checkpoint
    run_id: str | None = None  # a resumed run keeps its original id; else Flower's
    transport: str = IN_PROCESS  # "tls" or "insecure" in deployment, as the submitting command connected

    @property
    def ledger_path(self) -> Path:
        return self.out_dir / "ledger.sqlite"

    def client_dir(self, client_id: str) -> Path:
        """A simulated client's own state (its ledger); in deployment a profile names this folder."""
        return self.out_dir / "clients" / client_id


def spec_from_run_config(run_config: Mapping[str, Any]) -> RunSpec:
    """``config-toml`` (a resolved config, inline) or ``config-file`` (its path) wins; otherwise ``scenario``
    plus dotted-key overrides.

    Inline is how ``fedllm run`` submits a deployed run: the nodes on other hosts cannot read the
    coordinator's files, and every side rebuilds the very same config (and so the same config hash).
    """
    out_dir = Path(str(run_config.get("out-dir") or "runs/flwr")).expanduser().resolve()
    config_file = str(run_config.get("config-file") or "")
    inline = str(run_config.get("config-toml") or "")
    transport = str(run_config.get("transport") or IN_PROCESS)
    overrides = {k: v for k, v in run_config.items() if k not in SPECIAL_KEYS}
    if inline:
        try:
            raw = tomllib.loads(inline)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"run config 'config-toml': invalid TOML: {exc}") from None
        return RunSpec(config=from_dict(raw, source="run config 'config-toml'"), out_dir=out_dir, transport=transport)
    if config_file:
        path = Path(config_file)
        raw = read_toml(path)
        return RunSpec(config=from_dict(raw, source=str(path)), out_dir=out_dir, transport=transport)
    config, _ = load_config(str(run_config.get("scenario") or "") or None, overrides)
    return RunSpec(config=config, out_dir=out_dir, transport=transport)


def federation_data(cfg: FederationConfig) -> FederatedData:
    """The one partition every simulated node and the coordinator agree on (deterministic in the config).

    Memoized per process. Every simulated client builds the *whole* federation's partition to find its
    own share, and partitioning costs about 10 ms per client (flwr-datasets), so without the cache each
    newly sampled client of a 1,000-client federation spent 5-15 s repartitioning, every round. The key
    also holds the stat of a file or directory source and the shared-data location, so a changed file
    or ``FEDLLM_SHARED`` still gives fresh data; errors are never cached.
    """
    return _federation_data(cfg.data, tuple(cfg.client_ids), cfg.seed, _source_stamp(cfg.data.source))


@lru_cache(maxsize=4)
def _federation_data(data: DataConfig, client_ids: tuple[str, ...], seed: int, _stamp: tuple) -> FederatedData:
    return load_federated(data, client_ids, seed)


def _source_stamp(source: str) -> tuple:
    """(path, mtime, size) of every file the source may read, plus the environment that locates data."""
    stamp: list[object] = [os.environ.get("FEDLLM_SHARED", ""), os.environ.get("FEDLLM_CACHE", "")]
    for base in (Path(source).expanduser(), shared_data_dir() / source):
        try:
            if base.is_file():
                files = [base]
            elif base.is_dir():
                files = sorted(p for p in base.rglob("*") if p.is_file())
            else:
                continue
            stamp += [(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
        except (OSError, ValueError):
            stamp.append(object())  # unreadable now: a key that never matches, so no stale hit
    return tuple(stamp)
