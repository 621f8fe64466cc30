"""Every path of a run directory and of a client's state folder, and typed readers for what they hold.

File names live here and nowhere else. Each file format keeps one owner, which both writes and reads it
(``config`` the TOML, ``metrics`` the JSON, ``checkpoint`` the arrays, ``ledger`` the SQLite); ``RunDir``
only knows where each file is and hands it to its owner, so a reader can never disagree with the writer.

Layout::

    DIR/config.toml         the resolved configuration (written once, at the start)
    DIR/ledger.sqlite       the coordinator's ledger
    DIR/metrics.json        per-round metrics, rewritten after every round
    DIR/checkpoint.npz      the last completed round's global tensors
    DIR/report.{json,md,html}
    DIR/clients/<id>/       a simulated client's state folder (a deployed node's profile names its own)
    DIR/empirical/          the auditor's files of an empirical audit
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm import checkpoint, metrics
from fedllm.checkpoint import Checkpoint
from fedllm.config import FederationConfig, from_dict, read_toml, to_toml
from fedllm.files import atomic_write_text
from fedllm.metrics import RunMetrics

CONFIG = "config.toml"
LEDGER = "ledger.sqlite"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.npz"
REPORTS = {"json": "report.json", "md": "report.md", "html": "report.html"}
CLIENTS = "clients"
EMPIRICAL = "empirical"
NODE_KEY = "node_key"
EXTRA_ROWS = "extra_rows.jsonl"
# In DIR/empirical/: every canary and its secret coin, the adversary's result, a re-run of the run's config.
EMPIRICAL_SECRET = "canaries.json"
EMPIRICAL_RESULT = "result.json"
EMPIRICAL_RERUN = "rerun"


@dataclass(frozen=True)
class ClientDir:
    """A client's own state: its ledger, its signing key, extra training rows (an empirical audit's canaries)."""

    root: Path

    @property
    def ledger_path(self) -> Path:
        return self.root / LEDGER

    @property
    def key_path(self) -> Path:
        return self.root / NODE_KEY

    @property
    def extra_rows_path(self) -> Path:
        return self.root / EXTRA_ROWS


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def ledger_path(self) -> Path:
        return self.root / LEDGER

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def clients_root(self) -> Path:
        return self.root / CLIENTS

    @property
    def empirical_dir(self) -> Path:
        return self.root / EMPIRICAL

    @property
    def empirical_secret_path(self) -> Path:
        return self.root / EMPIRICAL / EMPIRICAL_SECRET

    @property
    def empirical_result_path(self) -> Path:
        return self.root / EMPIRICAL / EMPIRICAL_RESULT

    @property
    def empirical_rerun_dir(self) -> Path:
        return self.root / EMPIRICAL / EMPIRICAL_RERUN

    def report_path(self, kind: str) -> Path:
        return self.root / REPORTS[kind]

    def client(self, client_id: str) -> ClientDir:
        return ClientDir(self.root / CLIENTS / client_id)

    def client_ids_on_disk(self) -> list[str]:
        """Client folders that hold a ledger, whatever the config says (an auditor compares the two)."""
        if not self.clients_root.is_dir():
            return []
        return sorted(d.name for d in self.clients_root.iterdir() if d.is_dir() and (d / LEDGER).is_file())

    def has_run(self) -> bool:
        """Whether a run has recorded anything here (its ledger or its metrics)."""
        return self.ledger_path.is_file() or self.metrics_path.is_file()

    def config_sha256(self) -> str:
        return hashlib.sha256(self.config_path.read_bytes()).hexdigest()

    def write_config(self, cfg: FederationConfig) -> None:
        """The resolved configuration, written once when a run starts (creates the directory)."""
        atomic_write_text(self.config_path, to_toml(cfg))

    def read_config(self) -> FederationConfig:
        """The run's configuration, parsed and validated by its owner; errors name the file."""
        return from_dict(read_toml(self.config_path), source=str(self.config_path))

    def read_config_data(self) -> dict[str, Any]:
        """``config.toml`` as plain TOML data, unvalidated ({} when absent): what a report shows, and what an
        auditor falls back on when the file no longer parses as a configuration."""
        return read_toml(self.config_path) if self.config_path.is_file() else {}

    def read_metrics(self) -> RunMetrics:
        return metrics.read(self.metrics_path)

    def read_checkpoint(self) -> Checkpoint:
        return checkpoint.load(self.checkpoint_path)
