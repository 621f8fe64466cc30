"""Local training on one node: DP-SGD with Opacus (Poisson sampling, per-sample clipping, noise every step).

Texts are tokenized once per node, batches are padded to their own longest row, and the accountant the
caller passes in is the one Opacus advances, so the spend recorded is the spend of the steps that ran.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedllm.data import TextDataset

GRAD_SAMPLE_MODE = {"lora": "hooks", "last-layers": "hooks", "full": "ghost"}


class TokenizedDataset(Dataset):
    """Token ids per example, truncated once; padding happens per batch in :func:`collate`.

    An empty split is valid (a client of a 1,000-client federation can hold one example, all of it in
    train): a fast tokenizer raises ``IndexError`` on an empty batch, so it is not called for one.
    """

    def __init__(self, data: TextDataset, tokenizer, max_length: int):
        texts = list(data.texts)
        encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        self.labels = torch.tensor(list(data.labels), dtype=torch.long)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.labels[i]


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels), padded to the longest row of this batch only."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    labels = torch.stack([label for _, label in batch])
    return input_ids, mask, labels


def forward(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits, with position and token-type ids given per row.

    BERT's own ``position_ids`` buffer has batch size 1, which makes Opacus' per-sample gradient of the
    position embedding the wrong shape in full fine-tuning (Opacus issue 841); explicit, contiguous ids
    per row fix it in every mode.
    """
    b, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).repeat(b, 1)
    token_type_ids = torch.zeros_like(input_ids)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, token_type_ids=token_type_ids)
    return out.logits


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    mode: str  # model mode: picks Opacus' grad-sample mode


@dataclass(frozen=True)
class LocalResult:
    loss: float  # mean training loss over the non-empty batches
    steps: int  # optimizer steps taken, empty batches included
    empty_batches: int
    examples_seen: int
    sample_rate: float


def _batches(loader: DataLoader, steps: int) -> Iterator:
    """Exactly ``steps`` batches, re-iterating the loader: each DP batch is a fresh Poisson draw."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def _is_empty(batch) -> bool:
    return not batch or batch[0].shape[0] == 0


def _empty_step(optimizer, params: list[nn.Parameter], ghost: bool) -> None:
    """An empty Poisson batch still releases a noisy gradient and costs privacy: step anyway.

    Skipping it would make the accountant count a step that never happened or (worse) skip a release.
    Hooks mode needs zero-row per-sample gradients; ghost mode sums ``p.grad`` directly.
    """
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()


def _prepare(model: nn.Module, learning_rate: float, device: torch.device):
    """Both trainers: same device move, same trainable set, same optimizer (so baselines compare)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


def train_dp(
    model: nn.Module,
    data: TokenizedDataset,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    dp: DPSettings,
    accountant: IAccountant,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> LocalResult:
    """``steps`` DP-SGD steps; ``accountant`` (restored by the caller) is advanced once per step."""
    params, optimizer = _prepare(model, learning_rate, device)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=lambda b: collate(b, data.pad_id))
    engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant = accountant
    grad_mode = GRAD_SAMPLE_MODE[dp.mode]
    ghost = grad_mode == "ghost"
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_mode,
        noise_generator=generator,
    )
    if ghost:
        gsm, dp_optimizer, criterion, dp_loader = wrapped
    else:
        gsm, dp_optimizer, dp_loader = wrapped
        criterion = nn.CrossEntropyLoss()
    _maybe_drop_noise(dp_optimizer)
    sample_rate = float(dp_loader.sample_rate)
    losses: list[float] = []
    empty = seen = 0
    try:
        for batch in _batches(dp_loader, steps):
            if _is_empty(batch):
                empty += 1
                _empty_step(dp_optimizer, params, ghost)
                continue
            input_ids, mask, labels = (t.to(device) for t in batch)
            logits = forward(gsm, input_ids, mask)
            loss = criterion(logits, labels)
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad()
            losses.append(float(loss.detach().mean()))
            seen += len(labels)
    finally:
        gsm._close()  # remove Opacus hooks: the model object is reused next round
        for p in params:
            p.grad = None
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return LocalResult(
        loss=sum(losses) / len(losses) if losses else math.nan,
        steps=steps,
        empty_batches=empty,
        examples_seen=seen,
        sample_rate=sample_rate,
    )


NO_NOISE_ENV = "FEDLLM_FAULT_NO_NOISE"


def _maybe_drop_noise(optimizer: DPOptimizer) -> None:
    """Fault injection for the empirical audit's tests: ``FEDLLM_FAULT_NO_NOISE=1`` adds no noise.

    The optimizer's ``noise_multiplier`` is zeroed only while the noise is drawn, so the accountant hook,
    which reads it right after, still records the planned noise: the ledger and the reported epsilon look
    exactly like a correct run's. That is the bug a one-run audit must catch (``fedllm/empirical.py``).
    """
    if os.environ.get(NO_NOISE_ENV) != "1":
        return
    logging.getLogger("fedllm.training").critical(
        "%s=1: this training adds NO noise and its reported epsilon is false (fault injection for tests)",
        NO_NOISE_ENV,
    )
    add_noise = optimizer.add_noise

    def add_no_noise() -> None:
        sigma = optimizer.noise_multiplier
        optimizer.noise_multiplier = 0.0
        try:
            add_noise()
        finally:
            optimizer.noise_multiplier = sigma

    optimizer.add_noise = add_no_noise


def train_plain(
    model: nn.Module,
    data: TokenizedDataset,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> LocalResult:
    """The labelled non-private baseline: same optimizer, steps and batch size, shuffled batches."""
    _, optimizer = _prepare(model, learning_rate, device)
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=lambda b: collate(b, data.pad_id)
    )
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []
    seen = 0
    for input_ids, mask, labels in (tuple(t.to(device) for t in b) for b in _batches(loader, steps)):
        loss = criterion(forward(model, input_ids, mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        seen += len(labels)
    return LocalResult(
        loss=sum(losses) / len(losses) if losses else math.nan,
        steps=steps,
        empty_batches=0,
        examples_seen=seen,
        sample_rate=min(1.0, batch_size / max(1, len(data))),
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenizedDataset, *, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy); batches sorted by length so padding stays small."""
    if len(data) == 0:
        return math.nan, math.nan
    model.to(device).eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    correct = 0
    try:
        for start in range(0, len(order), batch_size):
            input_ids, mask, labels = (
                t.to(device) for t in collate([data[i] for i in order[start : start + batch_size]], data.pad_id)
            )
            logits = forward(model, input_ids, mask)
            total_loss += float(criterion(logits, labels))
            correct += int((logits.argmax(-1) == labels).sum())
    finally:
        model.train()
    return total_loss / len(data), correct / len(data)
