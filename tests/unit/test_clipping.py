"""Book-keeping clipping (fedllm/clipping.py): the clipped sum is per-example clipping's, from one backward pass,
and noise, averaging and accounting are exactly what Opacus' ghost mode did (the noise std on empty steps is
tests/unit/test_training.py's, for every mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from support import make_checkpoint
from torch import nn

from fedllm import clipping, training
from fedllm.accounting import make_accountant
from fedllm.clipping import BookKeeping, BookKeepingOptimizer
from fedllm.config import ModelConfig
from fedllm.model import build_model
from fedllm.training import DPSettings, TokenizedDataset, forward, train_dp

DEVICE = torch.device("cpu")
LENGTHS = (5, 12, 9, 3, 12, 7, 10)  # padded to 12 in the batch; per example, each row alone at its own length


FAMILIES = ("bert", "roberta", "electra", "distilbert", "deberta-v2")


def _model(name: str = "tiny-bert"):
    return build_model(ModelConfig(name=name, mode="full", max_length=32), num_labels=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {f: str(make_checkpoint(f, root / f)) for f in FAMILIES}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths (so padding), with a token repeated inside a row (embedding rows add up)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros((len(LENGTHS), max(LENGTHS)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, :length] = torch.randint(1000, 30000, (length,), generator=gen)
        ids[row, length // 2] = ids[row, 1]
        mask[row, :length] = 1
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    return ids, mask, labels


def _check_against_by_hand(model, norm_mode: str) -> None:
    """Batched book-keeping vs each example's own gradient clipped by hand: norms and every clipped sum."""
    ids, mask, labels = _batch()
    per_example = _per_example_grads(model, ids, mask, labels)
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_example])
    ordered = norms.sort().values
    clip = float(ordered[3] + ordered[4]) / 2  # some examples clipped, some not
    factors = (clip / (norms + clipping.CLIP_EPS)).clamp(max=1.0)
    assert 0 < int((factors < 1).sum()) < len(LENGTHS)
    want = [sum(factors[i] * per_example[i][k] for i in range(len(LENGTHS))) for k in range(len(per_example[0]))]
    unclipped = [sum(grads[k] for grads in per_example) for k in range(len(want))]

    clipper = BookKeeping(model, max_grad_norm=clip, norm_mode=norm_mode)
    got_norms = clipper.backward(F.cross_entropy(forward(clipper, ids, mask), labels, reduction="none"))
    clipper._close()
    got = [p.grad for p in clipper.params]

    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=0)
    total = torch.sqrt(sum(w.square().sum() for w in want))
    diff = torch.sqrt(sum((g - w).square().sum() for g, w in zip(got, want, strict=True)))
    assert float(diff / total) <= 1e-5
    for g, w in zip(got, want, strict=True):
        if float(w.norm()) > 1e-6 * float(total):
            assert float((g - w).norm() / w.norm()) <= 1e-5
        else:  # gradients that are zero in exact arithmetic (attention key biases): float noise on both sides
            assert float(g.norm()) <= 1e-6 * float(total)
    # the comparison can tell clipping from no clipping
    gap = torch.sqrt(sum((u - w).square().sum() for u, w in zip(unclipped, want, strict=True)))
    assert float(gap / total) > 1e-3


def _per_example_grads(model, ids, mask, labels) -> list[list[torch.Tensor]]:
    """Each example alone, unpadded, its own backward: the reference the batched computation must equal."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for row, length in enumerate(LENGTHS):
        model.zero_grad(set_to_none=True)
        logits = forward(model, ids[row : row + 1, :length], mask[row : row + 1, :length])
        F.cross_entropy(logits, labels[row : row + 1]).backward()
        grads.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("norm_mode", clipping.NORM_MODES)
def test_clipped_sum_equals_per_example_clipping_by_hand(norm_mode):
    """Padded batch, some examples clipped: every weight's clipped sum to 1e-5, whichever norm each layer uses."""
    _check_against_by_hand(_model(), norm_mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_in_full_mode_matches_clipping_by_hand(family, checkpoints):
    """Full fine-tuning of any family uses book-keeping: its layers (ELECTRA's embedding projection, RoBERTa's
    offset positions, DistilBERT's, DeBERTa's relative attention) must give the same clipped sums."""
    _check_against_by_hand(_model(checkpoints[family]), "auto")


def test_one_backward_pass_and_no_weight_gradient_in_it():
    """Opacus' ghost mode backpropagates twice; book-keeping once, and autograd accumulates no weight gradient."""
    model = _model()
    ids, mask, labels = _batch()
    clipper = BookKeeping(model, max_grad_norm=1.0)
    passes, accumulated = [], []
    handles = [p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p)) for p in clipper.params]
    logits = forward(clipper, ids, mask)
    logits.register_hook(lambda g: passes.append(g))
    clipper.backward(F.cross_entropy(logits, labels, reduction="none"))
    for h in handles:
        h.remove()
    clipper._close()
    assert len(passes) == 1
    assert accumulated == []  # every p.grad was written by the clipping, none by autograd
    assert all(p.grad is not None for p in clipper.params)


def _count_backward_passes(monkeypatch) -> list[int]:
    """Backward passes through the logits, per training step (a spy on training.logits_of)."""
    passes: list[int] = []
    original = training.logits_of

    def spy(model, inputs):
        logits = original(model, inputs)
        passes.append(0)
        logits.register_hook(lambda g: passes.__setitem__(-1, passes[-1] + 1))
        return logits

    monkeypatch.setattr(training, "logits_of", spy)
    return passes


def _train(data, mode_name: str, monkeypatch, *, steps=3, batch=16, seed=7, **kwargs):
    monkeypatch.setitem(training.GRAD_SAMPLE_MODE, "full", mode_name)
    model = _model()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    accountant = make_accountant("prv", [(1.0, 0.5, 3)])  # spend from earlier rounds
    result = train_dp(
        model,
        data,
        steps=steps,
        batch_size=batch,
        learning_rate=0.5,
        dp=DPSettings(0.5, 0.1, "full"),
        accountant=accountant,
        device=DEVICE,
        generator=torch.Generator().manual_seed(seed),
        optimizer="sgd",
        **kwargs,
    )
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    update = torch.cat([(p - b).flatten() for p, b in zip(after, before, strict=True)])
    return result, accountant.history, update


def test_full_mode_default_backpropagates_once_per_step(tiny_texts, tokenizer, monkeypatch):
    assert training.GRAD_SAMPLE_MODE["full"] == clipping.BOOK_KEEPING
    data = TokenizedDataset(tiny_texts, tokenizer, 32)
    passes = _count_backward_passes(monkeypatch)
    result, *_ = _train(data, clipping.BOOK_KEEPING, monkeypatch)
    assert passes == [1] * (result.steps - result.empty_batches)
    passes.clear()
    result, *_ = _train(data, "ghost", monkeypatch)  # the spy counts: Opacus' ghost mode shows its two passes
    assert passes == [2] * (result.steps - result.empty_batches)


@pytest.mark.parametrize("max_physical_batch", [None, 5])
def test_same_draws_noise_and_accounting_as_opacus_ghost_mode(max_physical_batch, tiny_texts, tokenizer, monkeypatch):
    """Same seed: the same Poisson batches and the same noise values, so the same update up to float rounding,
    and the same accountant history (one record per logical step, at the planned rate), virtual steps included."""
    data = TokenizedDataset(tiny_texts, tokenizer, 32)
    bk = _train(data, clipping.BOOK_KEEPING, monkeypatch, max_physical_batch=max_physical_batch)
    ghost = _train(data, "ghost", monkeypatch, max_physical_batch=max_physical_batch)
    assert bk[0] == ghost[0]
    assert bk[1] == ghost[1] == [(1.0, 0.5, 3), (0.5, 16 / 120, 3)]
    assert float((bk[2] - ghost[2]).norm() / ghost[2].norm()) <= 1e-5
    other_seed = _train(data, clipping.BOOK_KEEPING, monkeypatch, seed=8)
    assert float((other_seed[2] - ghost[2]).norm() / ghost[2].norm()) > 0.1  # the closeness above means something


@pytest.mark.parametrize("skips", [0, 2])
def test_released_gradient_is_bitwise_opacus(skips):
    """Same clipped sums, same generator: BookKeepingOptimizer releases exactly what Opacus' ghost-mode
    optimizer releases (its savings are copies, not a different draw), with virtual steps accumulating."""
    torch.manual_seed(0)
    sums = [[torch.randn(5, 3), torch.randn(3)] for _ in range(skips + 1)]
    released = []
    for cls in (DPOptimizerFastGradientClipping, BookKeepingOptimizer):
        params = [nn.Parameter(torch.zeros(5, 3)), nn.Parameter(torch.zeros(3))]
        opt = cls(
            torch.optim.SGD(params, lr=1.0),
            noise_multiplier=1.3,
            max_grad_norm=0.7,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(3),
        )
        for i, grads in enumerate(sums):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.signal_skip_step(do_skip=i < skips)
            opt.step()
            opt.zero_grad()
        released.append([p.detach().clone() for p in params])
    for a, b in zip(*released, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(released[0][0], -sum(s[0] for s in sums) / 4)  # noise was added


def test_unsupported_layers_and_shared_weights_are_refused():
    conv = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="Conv1d"):
        BookKeeping(conv, max_grad_norm=1.0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match="shared"):
        BookKeeping(nn.Sequential(first, second), max_grad_norm=1.0)
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1).requires_grad_(False))
    assert len(BookKeeping(frozen, max_grad_norm=1.0).params) == 2  # frozen layers of any type are fine
