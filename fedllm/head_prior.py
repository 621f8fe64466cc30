"""A head that starts as a zero-shot classifier: each label's row is the frozen encoder's embedding of its name.

Why: under DP every step is noisy, so where training starts matters more than without it. The label names
are public (the task's schema, known to every node and to the coordinator before any data is read), and so
is the encoder, so a head whose row for ``card_arrival`` is the embedding of "card arrival" is a zero-shot
nearest-label classifier that costs no privacy. DP-SGD then starts from a model that already classifies:
on Banking77 the zero-shot head alone scores 61 % (77 intents), and at epsilon 8 / 3 the DP head gains 2-3 /
4-5 validation points over a zero start (``docs/benchmarks.md``, "DP utility recipe").

Only the coordinator's initial model is built this way (clients always train from what they receive); the
rows are ``SCALE`` times the L2-normalised name embeddings, the same features the head reads, bias 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedllm.config import ModelConfig
from fedllm.features import features
from fedllm.head_lora import HEAD_LORA

LABEL_NAMES = "label-names"
SCALE = 10.0  # chosen on Banking77 validation (5: -0.7, 20: -4.4 points at epsilon 8)


def label_text(name: str) -> str:
    """``card_arrival`` -> ``card arrival``: the words the encoder knows."""
    return name.replace("_", " ").strip()


def init_head(model: nn.Module, cfg: ModelConfig, label_names: Sequence[str]) -> None:
    """Set the linear head's rows to the scaled label-name features when ``model.head_init`` asks for it."""
    if cfg.head_init != LABEL_NAMES:
        return
    head = model.head if cfg.mode == HEAD_LORA else model
    set_rows(head, torch.from_numpy(features(cfg, [label_text(n) for n in label_names])))


def set_rows(head: nn.Module, label_vectors: torch.Tensor, scale: float = SCALE) -> None:
    """Row c of the linear head := ``scale`` x label vector c, bias 0: the untrained head predicts the label
    whose name is nearest in cosine (``scale`` is the inverse softmax temperature)."""
    linear = head.net
    if not isinstance(linear, nn.Linear):  # validation refuses it; a guard, not a fallback
        raise ValueError("model.head_init: 'label-names' needs a linear head (head_hidden = 0)")
    with torch.no_grad():
        linear.weight.copy_(scale * label_vectors.to(linear.weight.dtype))
        linear.bias.zero_()
