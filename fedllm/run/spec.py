"""What both apps need to know about a run: the resolved config and where its records live.

``fedllm simulate`` resolves the config once and hands the same object to the ServerApp and every
ClientApp. Under ``flwr run`` the apps rebuild it from Flower's ``run_config`` (pyproject's
``[tool.flwr.app.config]`` plus ``--run-config`` overrides), by the same function.
"""

from __future__ import annotations

import hashlib
import pickle
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedllm.config import FederationConfig, from_dict, load_config, read_toml
from fedllm.errors import ConfigError
from fedllm.run.rundir import RunDir

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
    def run_dir(self) -> RunDir:
        return RunDir(self.out_dir)

    @property
    def ledger_path(self) -> Path:
        return self.run_dir.ledger_path

    def client_dir(self, client_id: str) -> Path:
        """A simulated client's own state (its ledger); in deployment a profile names this folder."""
        return self.run_dir.client(client_id).root


class ShippedSpec:
    """A run spec that crosses to Ray workers once per process, not once per message.

    Flower's Ray backend pickles the ClientApp, closures and all, with every message it hands a worker: a
    spec of 10,000 ``[[clients]]`` is 0.5 MB that took 0.1-0.2 s to pickle and as long to rebuild, for each
    of SecAgg+'s four messages per sampled client per round. Pickled once here; a worker rebuilds it once
    and finds it again by digest.
    """

    def __init__(self, spec: RunSpec, blob: bytes | None = None):
        self.spec = spec
        self._blob = pickle.dumps(spec) if blob is None else blob
        self._digest = hashlib.sha256(self._blob).hexdigest()

    def __reduce__(self) -> tuple[Any, tuple[str, bytes]]:
        return _unship, (self._digest, self._blob)


@lru_cache(maxsize=4)
def _unship(_digest: str, blob: bytes) -> ShippedSpec:
    return ShippedSpec(pickle.loads(blob), blob)


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
