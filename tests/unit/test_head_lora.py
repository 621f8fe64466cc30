"""head-lora: the head on cached features first, then LoRA from it, through the real client.

Claims tested so that they fail if false: while LoRA is inactive the model computes exactly head mode's
features (so the head phase may train on the cache); the head phase sends the LoRA tensors back exactly as
received and trains the head with DP; the LoRA phase noises every tensor that travels; both phases spend
the same planned mechanism, and the frozen encoder never changes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedllm.accounting import make_accountant
from fedllm.config import ModelConfig, from_dict
from fedllm.data.records import TextDataset
from fedllm.errors import ConfigError
from fedllm.features import features
from fedllm.head_lora import HEAD_PHASE, LORA_PHASE, lora_inactive, lora_parameters, phase
from fedllm.ledger import Ledger, entry_from_metrics
from fedllm.model import build_model, get_trainable, set_trainable, trainable_names
from fedllm.training import DPSettings, TokenizedDataset, collate, forward, train_dp

CPU = torch.device("cpu")
HEAD_LORA = ModelConfig(name="tiny-bert", mode="head-lora", head_rounds=1, max_length=32)


pytestmark = pytest.mark.usefixtures("own_feature_cache")  # each test embeds into its own cache


def _frozen_digest(model: torch.nn.Module) -> str:
    """Every tensor that does not train: the encoder's own weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def test_inactive_lora_computes_head_modes_features(tiny_texts, tokenizer):
    model = build_model(HEAD_LORA, num_labels=2)
    names = trainable_names(model)
    assert names[-2:] == ["head.net.weight", "head.net.bias"]
    assert all("lora_" in n for n in names[:-2]) and len(names) == 2 + 8  # 2 layers x (query, value) x (A, B)
    assert lora_inactive(model)
    head = model.head.net
    with torch.no_grad():
        head.weight.normal_()  # a trained-looking head, so the comparison is not between zeros
        head.bias.normal_()
        ids, mask, _ = collate(list(TokenizedDataset(tiny_texts, tokenizer, 32))[:20], tokenizer.pad_token_id)
        through_encoder = forward(model, ids, mask)
        on_cached = model.head(torch.from_numpy(features(HEAD_LORA, tiny_texts.texts[:20])))
    torch.testing.assert_close(through_encoder, on_cached, rtol=1e-5, atol=1e-5)


def test_phase_follows_the_rounds_and_never_trains_a_head_on_stale_features():
    model = build_model(HEAD_LORA, num_labels=2)
    assert phase("head-lora", 2, 1, model) == phase("head-lora", 2, 2, model) == HEAD_PHASE
    assert phase("head-lora", 2, 3, model) == LORA_PHASE
    assert phase("lora", 2, 1, model) == "lora"
    with torch.no_grad():
        next(p for n, p in lora_parameters(model) if "lora_B" in n)[0, 0] = 1e-3
    assert phase("head-lora", 2, 1, model) == LORA_PHASE  # adapters moved: the cache no longer holds its features


def test_head_lora_needs_head_rounds():
    raw = {"name": "x", "model": {"name": "tiny-bert", "mode": "head-lora"}, "data": {"source": "synthetic"}}
    with pytest.raises(ConfigError, match=r"model\.head_rounds.*>= 1 in head-lora mode"):
        from_dict(raw, source="scenario.toml")


def _arrays_by_name(model: torch.nn.Module, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(trainable_names(model), arrays, strict=True))


def test_a_node_trains_the_head_then_lora_with_one_mechanism(deployed_node):
    """Through the real deployed-node client: round 1 (head phase), then round 2 (LoRA phase)."""
    node = deployed_node()
    config = node.run_config(**{"model.mode": "head-lora", "model.head_rounds": 1, "model.max_length": 16})
    client = node.client(config)
    model = build_model(config.model, num_labels=4)
    frozen = _frozen_digest(model)
    sent = get_trainable(model)
    got, _, metrics = client.fit([a.copy() for a in sent], {"server-round": 1})
    before, after = _arrays_by_name(model, sent), _arrays_by_name(model, got)
    for name in before:
        if "lora_" in name:  # the head phase returns the adapters exactly as received: nothing of the data
            assert after[name].tobytes() == before[name].tobytes(), name
        else:
            assert (after[name] != before[name]).mean() > 0.95, name  # the head trained (with noise everywhere)
    assert entry_from_metrics(metrics).status == "trained"

    got2, _, metrics2 = client.fit([a.copy() for a in got], {"server-round": 2})
    second = _arrays_by_name(model, got2)
    for name, value in second.items():  # LoRA trains now: every tensor moves, B away from zero
        assert (value != after[name]).mean() > 0.95, name
    assert entry_from_metrics(metrics2).status == "trained"
    with Ledger(node.ledger) as ledger:
        trained = [e for e in ledger.entries() if e.status == "trained"]
    assert [e.round for e in trained] == [1, 2]
    assert trained[0].mechanism == trained[1].mechanism  # the phase never changes what a round spends
    assert trained[1].epsilon > trained[0].epsilon
    set_trainable(model, got2)
    assert _frozen_digest(model) == frozen  # the encoder's own weights never train


def _lora_update(data: TokenizedDataset, seed: int, noise: float) -> list[np.ndarray]:
    model = build_model(HEAD_LORA, num_labels=2)
    start = get_trainable(model)
    train_dp(
        model,
        data,
        steps=2,
        batch_size=len(data),
        learning_rate=0.05,
        dp=DPSettings(noise, 1.0, LORA_PHASE, sample_rate=1.0),
        accountant=make_accountant("prv"),
        device=CPU,
        generator=torch.Generator().manual_seed(seed),
        optimizer="sgd",  # AdamW would scale even 1e-9 of noise to full steps where the gradient is zero (LoRA A)
    )
    return [a - s for a, s in zip(get_trainable(model), start, strict=True)]


def test_every_tensor_that_travels_in_the_lora_phase_is_noised(tiny_texts, tokenizer):
    """Full batches (rate 1): two runs differ only by their noise, in every entry of every travelling tensor;
    a tensor sent without DP would agree between them."""
    data = TokenizedDataset(TextDataset(tiny_texts.texts[:40], tiny_texts.labels[:40]), tokenizer, 32)  # kept small
    a, b = _lora_update(data, 1, 1.0), _lora_update(data, 2, 1.0)
    quiet_a, quiet_b = _lora_update(data, 1, 1e-9), _lora_update(data, 2, 1e-9)
    for t_a, t_b, q_a, q_b in zip(a, b, quiet_a, quiet_b, strict=True):
        assert (t_a != t_b).mean() > 0.95
        assert np.abs(t_a - t_b).mean() > 10 * np.abs(q_a - q_b).mean()
