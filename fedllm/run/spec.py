"""What both apps need to know about a run: the resolved config and where its records live.

``fedllm simulate`` resolves the config once and hands the same object to the ServerApp and every
ClientApp. Under ``flwr run`` the apps rebuild it from Flower's ``run_config`` (pyproject's
``[tool.flwr.app.config]`` plus ``--run-config`` overrides), by the same function.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
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
    of SecAgg+'s four messages per sampled client per round. Pickled once here. Where this process drives
    Ray, the pickle goes to Ray's object store once per Ray session and a message carries only its digest
    and a reference (a 0.5 MB argument would be copied through the object store with every message); a
    worker fetches and rebuilds the spec once, on first use, and finds it again by digest. Pickled without
    Ray, the blob itself travels and is rebuilt once per process, as before.
    """

    def __init__(self, spec: RunSpec | None, blob: bytes | None = None, digest: str = "", ref: Any = None):
        self._spec = spec
        self._blob = pickle.dumps(spec) if blob is None and spec is not None else blob
        self._digest = digest or hashlib.sha256(self._blob or b"").hexdigest()
        self._ref = ref  # a worker's reference to the blob in the object store, fetched on first use
        self._stored: tuple[tuple[str, str], Any] | None = None  # (Ray node, job) -> the driver's reference
        self._lock = threading.Lock()

    @property
    def spec(self) -> RunSpec:
        if self._spec is None:
            self._spec = _REBUILT.get(self._digest) or _rebuild(self._digest, _fetch(self._ref))
        return self._spec

    def __reduce__(self) -> tuple[Any, tuple[str, Any]]:
        ref = self._object_ref()
        if ref is not None:
            return _unship_ref, (self._digest, ref)
        return _unship, (self._digest, self._blob)

    def _object_ref(self) -> Any:
        """The blob in the object store of the Ray session this process drives, put there once; None without
        Ray. Keyed by node and job, so a later ``ray.init`` in the same process (tests) puts it again."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized() or self._blob is None:
            return None
        context = ray.get_runtime_context()
        session = (context.get_node_id(), context.get_job_id())
        with self._lock:  # Flower hands messages to the workers from a pool of threads
            if self._stored is None or self._stored[0] != session:
                self._stored = (session, ray.put(self._blob))
            return self._stored[1]


_REBUILT: dict[str, RunSpec] = {}  # digest -> the spec this process rebuilt from it


def _rebuild(digest: str, blob: bytes) -> RunSpec:
    if len(_REBUILT) >= 4:
        _REBUILT.clear()  # a worker serves one run at a time; never grow without bound
    spec = _REBUILT[digest] = pickle.loads(blob)
    return spec


def _fetch(ref: Any) -> bytes:
    import ray

    return ray.get(ref)


def _unship(digest: str, blob: bytes) -> ShippedSpec:
    spec = _REBUILT.get(digest) or _rebuild(digest, blob)
    return ShippedSpec(spec, blob, digest)


def _unship_ref(digest: str, ref: Any) -> ShippedSpec:
    """Called while Ray unpickles a message's arguments: the fetch waits for the first use of ``spec``."""
    return ShippedSpec(_REBUILT.get(digest), None, digest, ref)


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
