"""Local DP-SGD: every step adds noise and advances the accountant, empty Poisson batches included."""

from __future__ import annotations

import pytest
import torch

from fedllm import training
from fedllm.accounting import make_accountant
from fedllm.config import ModelConfig
from fedllm.model import build_model, count_parameters, get_trainable, set_trainable
from fedllm.training import DPSettings, TokenizedDataset, evaluate, train_dp, train_plain

DEVICE = torch.device("cpu")


def _model(mode: str = "lora"):
    return build_model(ModelConfig(name="tiny-bert", mode=mode, max_length=32), num_labels=2)


def _flat(model) -> torch.Tensor:
    return torch.cat([torch.as_tensor(a).flatten() for a in get_trainable(model)])


@pytest.mark.parametrize("mode", ["lora", "last-layers", "full"])
def test_each_mode_trains_under_dp_and_counts_every_step(mode, tiny_texts, tokenizer):
    model = _model(mode)
    data = TokenizedDataset(tiny_texts, tokenizer, 32)
    accountant = make_accountant("prv", [(1.0, 0.5, 3)])  # spend from earlier rounds
    before = _flat(model)
    result = train_dp(
        model,
        data,
        steps=4,
        batch_size=16,
        learning_rate=1e-2,
        dp=DPSettings(1.0, 1.0, mode),
        accountant=accountant,
        device=DEVICE,
    )
    q = 16 / 120  # expected batch over the data's size: the rate the loader draws with and the accountant records
    assert result.sample_rate == q
    assert accountant.history == [(1.0, 0.5, 3), (1.0, q, 4)]
    assert not torch.equal(before, _flat(model))
    # the model object is reusable: Opacus hooks are gone after the round
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_trainable_sets_per_mode():
    lora, last, full = (count_parameters(_model(m))[0] for m in ("lora", "last-layers", "full"))
    assert lora < last < full
    assert full == count_parameters(_model("full"))[1]


def test_empty_batches_happen_and_still_step(tiny_texts, tokenizer):
    """Expected batch size 1: about 37% of Poisson batches are empty; all must count."""
    data = TokenizedDataset(tiny_texts, tokenizer, 32)
    accountant = make_accountant("prv")
    result = train_dp(
        _model(),
        data,
        steps=40,
        batch_size=1,
        learning_rate=1e-2,
        dp=DPSettings(1.0, 1.0, "lora"),
        accountant=accountant,
        device=DEVICE,
    )
    assert result.empty_batches > 0
    assert accountant.history == [(1.0, 1 / 120, 40)]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_an_all_empty_round_still_releases_noise(mode, tiny_texts, tokenizer, monkeypatch):
    """If empty batches skipped the noise, parameters would not move when every batch is empty."""
    monkeypatch.setattr(training, "_is_empty", lambda batch: True)
    model = _model(mode)
    before = _flat(model)
    accountant = make_accountant("prv")
    result = train_dp(
        model,
        TokenizedDataset(tiny_texts, tokenizer, 32),
        steps=3,
        batch_size=16,
        learning_rate=1e-2,
        dp=DPSettings(1.0, 1.0, mode),
        accountant=accountant,
        device=DEVICE,
    )
    assert result.empty_batches == 3 and result.examples_seen == 0
    assert accountant.history == [(1.0, 16 / 120, 3)]
    assert not torch.equal(before, _flat(model))


def test_non_private_baseline_learns_and_evaluate_reports_accuracy(tiny_texts, tokenizer):
    model = _model("full")
    data = TokenizedDataset(tiny_texts, tokenizer, 32)
    _, acc0 = evaluate(model, data, batch_size=64, device=DEVICE)
    train_plain(model, data, steps=40, batch_size=16, learning_rate=1e-3, device=DEVICE)
    loss, acc = evaluate(model, data, batch_size=64, device=DEVICE)
    assert acc >= 0.9 > acc0 or acc >= 0.9
    assert loss < 0.5


def test_set_trainable_rejects_wrong_shapes():
    model = _model()
    arrays = get_trainable(model)
    arrays[0] = arrays[0][:1]
    with pytest.raises(ValueError, match="shape"):
        set_trainable(model, arrays)


@pytest.mark.parametrize("mode", ["lora", "full"])  # hooks; book-keeping clipping (``fedllm.clipping``)
@pytest.mark.parametrize(("sigma", "clip", "batch"), [(1.0, 1.0, 16), (2.5, 0.5, 8)])
def test_noise_has_the_std_the_accountant_assumes(sigma, clip, batch, mode, tiny_texts, tokenizer, monkeypatch):
    """With nothing to learn (empty batches), the gradient the optimizer sees is the noise alone: its std must
    be noise_multiplier x max_grad_norm / expected batch size. Missing or mis-scaled noise fails here."""
    monkeypatch.setattr(training, "_is_empty", lambda b: True)
    seen: list[torch.Tensor] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    data = TokenizedDataset(tiny_texts, tokenizer, 32)
    train_dp(
        _model(mode),
        data,
        steps=2,
        batch_size=batch,
        learning_rate=1e-3,
        dp=DPSettings(sigma, clip, mode),
        accountant=make_accountant("prv"),
        device=DEVICE,
    )
    noise = torch.cat(seen) * batch  # undo the average over the expected batch (the loader's rate x n = batch)
    n = noise.numel()
    assert len(seen) == 2 and n > 4000  # LoRA: 4,228 draws; full: about 2 million
    # six standard errors of the estimates, at least 1 %
    assert float(noise.mean()) == pytest.approx(0.0, abs=max(0.01, 6 / n**0.5) * sigma * clip)
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=max(0.01, 6 / (2 * n) ** 0.5))
