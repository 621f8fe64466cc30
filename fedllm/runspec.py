"""What both apps need to know about a run: the resolved config and where its records live.

``fedllm simulate`` resolves the config once and hands the same object to the ServerApp and every
ClientApp. Under ``flwr run`` the apps rebuild it from Flower's ``run_config`` (pyproject's
``[tool.flwr.app.config]`` plus ``--run-config`` overrides), by the same function.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import FederationConfig, from_dict, load_config, read_toml
from fedllm.data import FederatedData, load_federated

SPECIAL_KEYS = ("scenario", "out-dir", "config-file")


@dataclass(frozen=True)
class RunSpec:
    config: FederationConfig
    out_dir: Path
    resume: bool = False  # continue the run recorded in out_dir from its checkpoint
    run_id: str | None = None  # a resumed run keeps its original id; else Flower's

    @property
    def ledger_path(self) -> Path:
        return self.out_dir / "ledger.sqlite"

    def client_dir(self, client_id: str) -> Path:
        """A simulated client's own state (its ledger); in deployment a profile names this folder."""
        return self.out_dir / "clients" / client_id


def spec_from_run_config(run_config: Mapping[str, Any]) -> RunSpec:
    """``config-file`` (a resolved config.toml) wins; otherwise ``scenario`` plus dotted-key overrides."""
    out_dir = Path(str(run_config.get("out-dir") or "runs/flwr")).expanduser().resolve()
    config_file = str(run_config.get("config-file") or "")
    overrides = {k: v for k, v in run_config.items() if k not in SPECIAL_KEYS}
    if config_file:
        path = Path(config_file)
        raw = read_toml(path)
        return RunSpec(config=from_dict(raw, source=str(path)), out_dir=out_dir)
    config, _ = load_config(str(run_config.get("scenario") or "") or None, overrides)
    return RunSpec(config=config, out_dir=out_dir)


def federation_data(cfg: FederationConfig) -> FederatedData:
    """The one partition every simulated node and the coordinator agree on (deterministic in the config)."""
    return load_federated(cfg.data, cfg.client_ids, cfg.seed)
