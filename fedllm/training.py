"""Local training on one node: DP-SGD with Opacus (Poisson sampling, per-sample clipping, noise every step).

Texts are tokenized once per node, batches are padded to their own longest row, and the accountant the
caller passes in is the one Opacus advances, so the spend recorded is the spend of the steps that ran.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from fedllm import clipping, faults
from fedllm.data.records import TextDataset

# Full fine-tuning: book-keeping clipping (fedllm/clipping.py), one backward pass where Opacus' ghost ran two.
GRAD_SAMPLE_MODE = {"lora": "hooks", "last-layers": "hooks", "full": clipping.BOOK_KEEPING, "head": "hooks"}


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

    Families differ (:func:`_id_kwargs`): RoBERTa counts positions from ``padding_idx + 1`` and DistilBERT
    takes no token types, so the ids are built for the model's family, as its own forward would build them.
    """
    b, length = input_ids.shape
    offset, token_types = _id_kwargs(model)
    if offset is None:
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).repeat(b, 1)
    else:  # fairseq convention: real tokens at offset+1, offset+2, ...; padding at offset (masked anyway)
        position_ids = (torch.cumsum(mask, dim=1) * mask + offset).long().contiguous()
    kwargs = {"position_ids": position_ids}
    if token_types:
        kwargs["token_type_ids"] = torch.zeros_like(input_ids)
    out = model(input_ids=input_ids, attention_mask=mask, **kwargs)
    return out.logits


# Families whose position ids start after the padding index (RoBERTa's, inherited from fairseq).
PADDING_OFFSET_FAMILIES = ("roberta", "xlm-roberta", "camembert")


def _id_kwargs(model: nn.Module) -> tuple[int | None, bool]:
    """(position offset or None for 0-based positions, whether the model takes ``token_type_ids``).

    Looks through Opacus' ``GradSampleModule`` and peft's wrappers to the transformers model underneath;
    a module that is not a transformers model (a bare head) gets BERT's convention.
    """
    import inspect

    inner = model
    while hasattr(inner, "_module"):  # Opacus GradSampleModule
        inner = inner._module
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if config is None:
        return None, True
    offset = int(config.pad_token_id or 0) if config.model_type in PADDING_OFFSET_FAMILIES else None
    return offset, "token_type_ids" in inspect.signature(inner.forward).parameters


def collate_for(data: Dataset):
    """Token rows are padded per batch; feature rows (head mode, ``fedllm/features.py``) stack as they are."""
    if isinstance(data, TokenizedDataset):
        return lambda b: collate(b, data.pad_id)
    return getattr(data, "collate", default_collate)


def logits_of(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(input_ids, mask) go through the encoder; a single features tensor goes straight into the head."""
    return forward(model, *inputs) if len(inputs) == 2 else model(inputs[0])


@dataclass(frozen=True)
class DPSettings:
    """The mechanism's knobs as the loader and optimizer use them.

    ``sample_rate`` is the Poisson rate the loader draws with and the accountant records: one number, so
    the rate that ran and the rate that was accounted cannot differ. Unset, it is the expected batch over
    the data's size (for callers without a plan, such as benchmarks); a client always passes its plan's.
    """

    noise_multiplier: float
    max_grad_norm: float
    mode: str  # model mode: picks Opacus' grad-sample mode
    sample_rate: float | None = None


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


def _logical_batches(loader: DataLoader, optimizer: DPOptimizer, steps: int) -> Iterator:
    """Physical batches until ``steps`` logical ones have been stepped (noised, accounted).

    Without virtual steps every batch is a logical one. With them, Opacus' splitting sampler tells the
    optimizer which chunk ends its logical batch; only that chunk's ``step()`` adds noise and calls the
    accountant hook, so a step is counted when the optimizer did not skip it.
    """
    done = 0
    while done < steps:
        for batch in loader:
            yield batch  # the caller steps the optimizer before asking for the next one
            if not optimizer._is_last_step_skipped:
                done += 1
                if done == steps:
                    return


def _is_empty(batch) -> bool:
    return not batch or batch[0].shape[0] == 0


def _empty_step(optimizer, params: list[nn.Parameter], ghost: bool) -> None:
    """An empty Poisson batch still releases a noisy gradient and costs privacy: step anyway.

    Skipping it would make the accountant count a step that never happened or (worse) skip a release.
    Hooks mode needs zero-row per-sample gradients; ghost and book-keeping modes sum ``p.grad`` directly.
    """
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()


OPTIMIZERS = ("adamw", "sgd")


def _prepare(model: nn.Module, learning_rate: float, device: torch.device, optimizer: str = "adamw"):
    """Both trainers: same device move, same trainable set, same optimizer (so baselines compare).

    ``sgd`` is SGD with momentum 0.9: under DP the momentum averages the noise of successive steps, where
    Adam's per-coordinate scaling turns noise-dominated coordinates into full-size steps.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        return params, torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
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
    max_physical_batch: int | None = None,
    optimizer: str = "adamw",
) -> LocalResult:
    """``steps`` DP-SGD steps; ``accountant`` (restored by the caller) is advanced once per step.

    ``max_physical_batch`` bounds memory for large logical batches (Opacus' virtual steps): each Poisson
    batch is cut into chunks of at most this many rows whose clipped gradients are summed, and noise, the
    optimizer step and the accountant's record happen once per logical batch, at its sample rate.
    """
    params, base_optimizer = _prepare(model, learning_rate, device, optimizer)
    sample_rate = dp.sample_rate if dp.sample_rate is not None else min(1.0, batch_size / max(1, len(data)))
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate {sample_rate!r} is not in (0, 1]")
    # Our own Poisson loader at exactly this rate. Opacus' make_private would derive the rate from the
    # loader's length (1/ceil(n/B)), which is not the planned rate for some (n, B) and moves with n.
    loader = DPDataLoader(data, sample_rate=sample_rate, collate_fn=collate_for(data), generator=generator)
    engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant = accountant
    grad_mode = GRAD_SAMPLE_MODE[dp.mode]
    ghost = grad_mode in ("ghost", clipping.BOOK_KEEPING)  # the optimizer takes p.grad as the clipped sum
    if grad_mode == clipping.BOOK_KEEPING:  # Opacus' optimizer and this loader; the clipping is ours
        gsm, dp_optimizer, criterion = clipping.make_private(
            model,
            base_optimizer,
            nn.CrossEntropyLoss(),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            noise_generator=generator,
        )
        dp_loader = loader
    else:
        wrapped = engine.make_private(
            module=model,
            optimizer=base_optimizer,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples; see the comment there
            grad_sample_mode=grad_mode,
            noise_generator=generator,
        )
        if ghost:
            gsm, dp_optimizer, criterion, dp_loader = wrapped
        else:
            gsm, dp_optimizer, dp_loader = wrapped
            criterion = nn.CrossEntropyLoss()
    # The accountant records the loader's own rate, once per optimizer step (make_private's hook used
    # 1/len(loader)); the average gradient divides by the expected batch at that rate.
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=float(dp_loader.sample_rate)))
    dp_optimizer.expected_batch_size = max(1.0, float(dp_loader.sample_rate) * len(data))
    _maybe_drop_noise(dp_optimizer)
    sample_rate = float(dp_loader.sample_rate)
    losses: list[float] = []
    empty = seen = 0
    if max_physical_batch is not None:
        dp_loader = wrap_data_loader(data_loader=dp_loader, max_batch_size=max_physical_batch, optimizer=dp_optimizer)
    try:
        for batch in _logical_batches(dp_loader, dp_optimizer, steps):
            if _is_empty(batch):
                empty += 1
                _empty_step(dp_optimizer, params, ghost)
                continue
            *inputs, labels = (t.to(device) for t in batch)
            loss = criterion(logits_of(gsm, inputs), labels)
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


def _maybe_drop_noise(optimizer: DPOptimizer) -> None:
    """Fault injection for the empirical audit's tests: ``FEDLLM_FAULT_NO_NOISE=1`` adds no noise.

    The optimizer's ``noise_multiplier`` is zeroed only while the noise is drawn, so the accountant hook,
    which reads it right after, still records the planned noise: the ledger and the reported epsilon look
    exactly like a correct run's. That is the bug a one-run audit must catch (``fedllm/audit/empirical_attack.py``).
    The switch works only in a test simulation (``fedllm/faults.py``) and is refused anywhere else.
    """
    if not faults.armed(faults.NO_NOISE):
        return
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
    optimizer: str = "adamw",
) -> LocalResult:
    """The labelled non-private baseline: same optimizer, steps and batch size, shuffled batches."""
    _, optimizer = _prepare(model, learning_rate, device, optimizer)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate_for(data))
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []
    seen = 0
    for *inputs, labels in (tuple(t.to(device) for t in b) for b in _batches(loader, steps)):
        loss = criterion(logits_of(model, inputs), labels)
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
    tokens = isinstance(data, TokenizedDataset)
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i])) if tokens else list(range(len(data)))
    batch_of = collate_for(data)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    correct = 0
    try:
        for start in range(0, len(order), batch_size):
            *inputs, labels = (t.to(device) for t in batch_of([data[i] for i in order[start : start + batch_size]]))
            logits = logits_of(model, inputs)
            total_loss += float(criterion(logits, labels))
            correct += int((logits.argmax(-1) == labels).sum())
    finally:
        model.train()
    return total_loss / len(data), correct / len(data)
