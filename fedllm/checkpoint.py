"""The coordinator's checkpoint: the global model after the last completed round, written atomically.

A coordinator killed mid-round restarts (``fedllm simulate --resume DIR``) from here, with the same global
model and round counter, so no round is counted twice. Clients need no checkpoint: their spend lives in
their own ledgers, written before they train.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedllm.errors import FedllmError
from fedllm.model import arrays_hash

FILE = "checkpoint.npz"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    run_id: str
    config_hash: str
    arrays: list[np.ndarray]


def save(out_dir: Path, ckpt: Checkpoint) -> None:
    """Write to a temporary file, fsync, then rename: a reader sees the old or the new checkpoint, never half."""
    buf = io.BytesIO()
    meta = {"round": ckpt.round, "run_id": ckpt.run_id, "config_hash": ckpt.config_hash}
    meta["arrays_hash"] = arrays_hash(ckpt.arrays)
    np.savez(buf, meta=np.array(json.dumps(meta)), **{f"arr_{i}": a for i, a in enumerate(ckpt.arrays)})
    tmp = out_dir / (FILE + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_dir / FILE)


def load(out_dir: Path) -> Checkpoint:
    path = out_dir / FILE
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
    return Checkpoint(
        round=int(meta["round"]), run_id=str(meta["run_id"]), config_hash=meta["config_hash"], arrays=arrays
    )
