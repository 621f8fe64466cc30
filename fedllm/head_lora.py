"""The head-then-LoRA schedule: a linear head trained on cached frozen features first, then LoRA from it.

Why: under DP the cheapest useful model is head mode's (a few thousand parameters, features computed once
per node), but a frozen encoder caps what the model can learn. ``head-lora`` spends the first
``model.head_rounds`` rounds on the head alone, exactly as head mode does, then adds LoRA adapters on the
encoder and trains both from the head it already has, so LoRA's first noisy steps start from a model that
already classifies instead of from a random head.

The model is one object in both phases: the encoder with LoRA adapters, mean pooling over the attention
mask, L2 normalisation (the recipe of :mod:`fedllm.features`), and head mode's head. LoRA's ``B`` matrices
start at zero, so while they are zero the encoder computes exactly the frozen encoder's features and the
head phase can train on the node's cached features instead of running the encoder. The tensors that travel
are the same in both phases (LoRA, then the head); in the head phase the LoRA tensors are returned exactly
as received (under SecAgg+ a zero delta) and carry nothing of the node's data.

Privacy: a round's mechanism (noise multiplier, sample rate, steps, clipping norm) does not depend on the
phase: DP-SGD clips and noises whatever tensors train. So the schedule, planned and calibrated as one,
costs what any mode with those settings costs, and a coordinator that lies about the round number changes
which tensors train, never what is spent.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

HEAD_LORA = "head-lora"
HEAD_PHASE, LORA_PHASE = "head", "lora"  # the mode each phase trains in (fedllm.training.GRAD_SAMPLE_MODE)


def mean_pool_l2(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden state over the attention mask, L2-normalised: how all-MiniLM-L6-v2 is used,
    and the one feature recipe of head mode, its export and head-lora's model."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1)


class PooledClassifier(nn.Module):
    """An encoder (with LoRA adapters) whose mean-pooled, normalised output feeds head mode's head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def config(self):
        return self.get_base_model().config

    def get_base_model(self) -> nn.Module:
        """The transformers encoder underneath peft: its family decides the position and token-type ids
        (:func:`fedllm.training.forward` reads them from here)."""
        inner = self.encoder
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **ids: torch.Tensor) -> SimpleNamespace:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **ids).last_hidden_state
        return SimpleNamespace(logits=self.head(mean_pool_l2(hidden, attention_mask)))


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def lora_inactive(model: nn.Module) -> bool:
    """True while every LoRA ``B`` is zero: the adapters then add exactly nothing to the encoder's output."""
    return all(not p.detach().any() for n, p in lora_parameters(model) if "lora_B" in n)


def phase(mode: str, head_rounds: int, server_round: int, model: nn.Module) -> str:
    """The mode a round trains in: head-lora's head phase while its rounds last and LoRA is still inactive
    (a resumed or altered model whose adapters already moved trains both, never a head on stale features)."""
    if mode != HEAD_LORA:
        return mode
    if server_round <= head_rounds and lora_inactive(model):
        return HEAD_PHASE
    return LORA_PHASE
