"""Frozen-encoder features for ``head`` mode: embed each text once per node, train only a small head on them.

Why: DP-SGD's noise grows with the number of trainable parameters and shrinks with the batch size, so the
recipe that gives private models worth having on a CPU is a linear (or small) head on features of a frozen,
public, pretrained encoder (Tramer & Boneh 2021). The features are mean-pooled over the attention mask and
L2-normalised (how all-MiniLM-L6-v2 was trained to be used), so every example's feature vector has norm 1
and per-example gradients of a linear head are bounded before clipping.

Computing them costs one encoder forward pass per text, so it is done once: in the process (a dict) and on
disk under ``$FEDLLM_CACHE/features/<key>/``, where ``key`` is the SHA-256 of the encoder's identity (model
name, checkpoint, max_length, pooling) and each row is addressed by the SHA-256 of its text. So a store
holds exactly "sha256(model + max_length + text) -> vector", and a node that is given a different
partition of the same texts (another seed, another client count) recomputes nothing. The encoder is never
trained, never travels, and runs under ``torch.no_grad()`` in eval mode: its weights are bit-identical
before and after a run. The features stay on the node that computed them (its own cache folder).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from fedllm.config import ModelConfig
from fedllm.data.records import TextDataset
from fedllm.files import atomic_write_bytes
from fedllm.head_lora import mean_pool_l2
from fedllm.model import TINY_BERT, checkpoint_source, frozen_encoder, hidden_size, load_tokenizer
from fedllm.paths import cache_dir
from fedllm.training import TokenizedDataset

POOLING = "mean-mask-l2-v2"  # part of the cache key: a change of pooling must never reuse old vectors
EMBED_BATCH = 64
DIGEST_BYTES = 32  # SHA-256

_lock = threading.Lock()
_memory: dict[str, dict[bytes, np.ndarray]] = {}  # encoder key -> text digest -> vector
_shards_read: dict[str, set[str]] = {}  # encoder key -> shard files already in _memory


def encoder_key(cfg: ModelConfig) -> str:
    """Identifies the frozen encoder and its input cut: the features of one key are interchangeable.

    The random ``tiny-bert`` depends on the seed; a checkpoint on its resolved path.
    """
    where = f"seed={cfg.seed}" if cfg.name == TINY_BERT else checkpoint_source(cfg.name)
    ident = f"{cfg.name}|{where}|max_length={cfg.max_length}|{POOLING}"
    return hashlib.sha256(ident.encode()).hexdigest()


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def store_dir(cfg: ModelConfig) -> Path:
    """``$FEDLLM_CACHE/features/<encoder key>`` (``$FEDLLM_FEATURES`` overrides the parent folder)."""
    parent = Path(os.environ["FEDLLM_FEATURES"]) if os.environ.get("FEDLLM_FEATURES") else cache_dir() / "features"
    return parent / encoder_key(cfg)


@torch.no_grad()
def _embed(cfg: ModelConfig, texts: Sequence[str]) -> np.ndarray:
    """Mean over the attention mask of the last hidden state, L2-normalised; batches sorted by length."""
    body = frozen_encoder(cfg)
    tokenizer = load_tokenizer(cfg.name)
    ids = tokenizer(list(texts), truncation=True, max_length=cfg.max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    dim = int(body.config.hidden_size)
    out = np.zeros((len(ids), dim), dtype=np.float32)
    pad = int(tokenizer.pad_token_id or 0)
    for start in range(0, len(order), EMBED_BATCH):
        rows = order[start : start + EMBED_BATCH]
        length = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        # The encoder builds its own position and token-type ids, by its family's convention (RoBERTa counts
        # positions from the padding index; DistilBERT has no token types): no gradient flows here, so
        # Opacus' need for explicit ids (``training.forward``) does not apply.
        hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        out[rows] = mean_pool_l2(hidden, mask).numpy()
    return out


def _read_new_shards(folder: Path, table: dict[bytes, np.ndarray], seen: set[str]) -> None:
    """Add the vectors of shards not read yet: another process (a simulated node in another Ray worker)
    may have embedded these texts since this process last looked."""
    if not folder.is_dir():
        return
    for shard in sorted(folder.glob("*.npz")):
        if shard.name in seen:
            continue
        try:
            with np.load(shard) as z:
                for key, vec in zip(z["keys"], z["vectors"], strict=True):
                    # numpy's fixed-width bytes drop trailing zero bytes (1 digest in 256 ends in one): pad back
                    table[bytes(key).ljust(DIGEST_BYTES, b"\0")] = vec
        except (OSError, ValueError, KeyError):  # a torn or foreign file: recompute rather than trust it
            continue
        seen.add(shard.name)


def _save_shard(folder: Path, keys: list[bytes], vectors: np.ndarray) -> str:
    """A new shard under a content name, written to a temp file and renamed: concurrent nodes never clash."""
    digest = hashlib.sha256(b"".join(keys)).hexdigest()[:32]
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys, dtype=f"S{DIGEST_BYTES}"), vectors=vectors)
    atomic_write_bytes(folder / f"{digest}.npz", buf.getvalue())
    return f"{digest}.npz"


def features(cfg: ModelConfig, texts: Sequence[str]) -> np.ndarray:
    """(n, hidden) float32 features of ``texts``; only texts not in the process or disk cache are embedded."""
    if not texts:
        return np.zeros((0, hidden_size(cfg)), dtype=np.float32)
    key = encoder_key(cfg)
    folder = store_dir(cfg)
    with _lock:
        table = _memory.setdefault(key, {})
        digests = [text_digest(t) for t in texts]
        if any(d not in table for d in digests):
            _read_new_shards(folder, table, _shards_read.setdefault(key, set()))
        missing: dict[bytes, str] = {}
        for d, t in zip(digests, texts, strict=True):
            if d not in table and d not in missing:
                missing[d] = t
        if missing:
            new_keys = list(missing)
            vectors = _embed(cfg, [missing[d] for d in new_keys])
            for d, v in zip(new_keys, vectors, strict=True):
                table[d] = v
            _shards_read.setdefault(key, set()).add(_save_shard(folder, new_keys, vectors))
        return np.stack([table[d] for d in digests]).astype(np.float32, copy=False)


class FeatureDataset(Dataset):
    """(feature vector, label) rows of one split: what a node trains its head on, every round."""

    def __init__(self, data: TextDataset, cfg: ModelConfig):
        self.features = torch.from_numpy(np.ascontiguousarray(features(cfg, data.texts)))
        self.labels = torch.tensor(list(data.labels), dtype=torch.long)

    @classmethod
    def from_arrays(cls, x: np.ndarray | torch.Tensor, y: Sequence[int] | torch.Tensor) -> FeatureDataset:
        """A dataset from precomputed features (benchmarks and tests)."""
        self = cls.__new__(cls)
        self.features = torch.as_tensor(x, dtype=torch.float32)
        self.labels = torch.as_tensor(y, dtype=torch.long)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by one index operation (torch's loaders call this when it exists): stacking rows
        one by one cost more than the head's DP step itself."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.features[idx], self.labels[idx]

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor] | list) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches from :meth:`__getitems__` are ready; a list of rows (evaluation) is stacked."""
        return batch if isinstance(batch, tuple) else default_collate(batch)


def node_dataset(cfg: ModelConfig, data: TextDataset) -> Dataset:
    """What a node (or the coordinator, for its central test set) trains or scores on, prepared once:
    feature rows in head mode, token rows in every mode that runs the encoder."""
    if cfg.mode == "head":
        return FeatureDataset(data, cfg)
    return TokenizedDataset(data, load_tokenizer(cfg.name), cfg.max_length)
