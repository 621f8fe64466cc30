"""The coordinator's checkpoint: the global model after the last completed round, written atomically.

A coordinator killed mid-round restarts (``fedllm simulate --resume DIR``) from here, with the same global
model and round counter, so no round is counted twice. Clients need no checkpoint: their spend lives in
their own ledgers, written before they train.

The checkpoint also carries what turns the arrays back into a model (``fedllm export``): each array's
parameter name and the label list, in label-index order. Checkpoints written before names were stored
(format 1: bare ``arr_0..arr_N``) still load for ``--resume``; :func:`require_names` refuses them for export.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedllm.errors import FedllmError
from fedllm.files import atomic_write_bytes

FORMAT = 2  # 1: arrays only; 2: + parameter names and labels


def arrays_hash(arrays: Sequence[np.ndarray]) -> str:
    """Identifies a model state in the ledger without storing it."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    round: int
    run_id: str
    config_hash: str
    arrays: list[np.ndarray]
    names: tuple[str, ...] = ()  # the trainable parameters' names, one per array; () in a format-1 file
    labels: tuple[str, ...] = ()  # class names, index i is logit i; () in a format-1 file
    fmt: int = field(default=FORMAT, compare=False)

    def __post_init__(self) -> None:
        if self.names and len(self.names) != len(self.arrays):
            raise ValueError(f"{len(self.names)} parameter names for {len(self.arrays)} arrays")


def save(path: Path, ckpt: Checkpoint) -> None:
    """Atomic (:mod:`fedllm.files`): a reader sees the old or the new checkpoint, never half."""
    buf = io.BytesIO()
    meta = {
        "format": FORMAT,
        "round": ckpt.round,
        "run_id": ckpt.run_id,
        "config_hash": ckpt.config_hash,
        "arrays_hash": arrays_hash(ckpt.arrays),
        "names": list(ckpt.names),
        "labels": list(ckpt.labels),
    }
    np.savez(buf, meta=np.array(json.dumps(meta)), **{f"arr_{i}": a for i, a in enumerate(ckpt.arrays)})
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = [data[f"arr_{i}"] for i in range(len(data.files) - 1)]
    except FileNotFoundError as exc:
        raise FedllmError(
            f"{path}: no checkpoint (the run completed no round, or this is not a run directory)"
        ) from exc
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise FedllmError(f"{path}: unreadable checkpoint ({exc}); it was left untouched") from exc
    if arrays_hash(arrays) != meta["arrays_hash"]:
        raise FedllmError(f"{path}: checkpoint content does not match its recorded hash")
    names = tuple(str(n) for n in meta.get("names", ()))
    if names and len(names) != len(arrays):
        raise FedllmError(f"{path}: {len(names)} parameter names for {len(arrays)} arrays; the file is inconsistent")
    return Checkpoint(
        round=int(meta["round"]),
        run_id=str(meta["run_id"]),
        config_hash=meta["config_hash"],
        arrays=arrays,
        names=names,
        labels=tuple(str(label) for label in meta.get("labels", ())),
        fmt=int(meta.get("format", 1)),
    )


def require_names(ckpt: Checkpoint, path: Path) -> None:
    """Export maps arrays to parameters by name; a format-1 checkpoint has none and is refused, not guessed."""
    if not ckpt.names or not ckpt.labels:
        raise FedllmError(
            f"{path}: written by an older fedllm without parameter names or labels (format {ckpt.fmt});"
            " it can still be resumed, but not exported: finish or rerun the run with this version"
        )
