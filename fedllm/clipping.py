"""Book-keeping per-example clipping: DP-SGD's clipped gradient sum from ONE backward pass.

Algorithm: Bu, Wang, Zha, Karypis, "Differentially private optimization on large model at small cost"
(ICML 2023; the fastDP library), "book-keeping" (BK). Why it is here: Opacus' ghost clipping, which full
fine-tuning used, runs backward twice (once for the per-example norms, once for the reweighted loss) and
its first pass computes every weight gradient only to throw it away; on MiniLM that made a DP step 1.9-2.6x
a plain one, and book-keeping 1.1-1.6x (1.24-1.31x per example trained on; docs/benchmarks.md, section 1).
Book-keeping needs one pass:

1. Forward hooks on every layer with trainable weights (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``:
   all a BERT-family encoder has) keep the layer's input ``a`` and its output.
2. ONE ``torch.autograd.grad`` of the summed per-example loss with respect to those outputs gives the output
   gradients ``g``; no weight gradient is computed in it (autograd skips a matmul nobody asked for).
3. From ``a`` and ``g`` each layer gives every example's squared gradient norm: for a linear layer on a
   sequence either the ghost norm ``<a_i a_i^T, g_i g_i^T>`` (cost ``B T^2 (d_in + d_out)``) or the
   materialised per-example gradient ``g_i^T a_i`` (cost ``B T d_in d_out``, memory ``B d_in d_out``):
   ghost when ``2 T^2 <= d_in d_out`` (the rule of the paper's mixed variant), per layer and batch length.
   Embeddings: ghost norm with an id-equality mask, or per-example rows for tables no longer than T.
4. Clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus' formula), then each weight's clipped sum
   ``sum_i c_i a_i^T g_i`` as one matmul of the rescaled output gradients (or a weighted sum of the
   materialised ones) written into ``p.grad``: the same work plain training spends on weight gradients.

Noise, the division by the expected batch size, virtual steps and the accountant hook stay Opacus': the
optimizer is Opacus' ``DPOptimizerFastGradientClipping`` (ghost mode's, which takes ``p.grad`` as the
clipped sum) and adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` with Opacus' own draw;
:class:`BookKeepingOptimizer` only drops the full-model copies and zero-fills it makes around that draw.

A layer type outside the three is refused at wrapping time rather than trained unclipped, and so is a
weight shared by two modules (its per-example norm would need both at once).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import Tensor, nn

BOOK_KEEPING = "bookkeeping"  # the grad-sample mode name fedllm/training.py selects this module by
NORM_MODES = ("auto", "ghost", "per-sample")
CLIP_EPS = 1e-6  # Opacus' guard in max_grad_norm / (norm + eps)
SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)

# (squared per-example norms (B,), a function that adds the clipped sum to p.grad given the factors (B,))
Pending = tuple[Tensor, Callable[[Tensor], None]]


@dataclass
class _Call:
    module: nn.Module
    inputs: Tensor
    output: Tensor


class BookKeeping(nn.Module):
    """The model with book-keeping hooks; call it as the model, then :meth:`backward` on per-example losses.

    ``norm_mode``: ``auto`` picks ghost norm or materialised per-example gradients per layer (module
    docstring); ``ghost`` / ``per-sample`` force one for every layer (the tests check both against
    per-example clipping done by hand).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, norm_mode: str = "auto"):
        super().__init__()
        if norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode {norm_mode!r} is not one of {NORM_MODES}")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.norm_mode = norm_mode
        self.layers = _trainable_layers(module)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._calls: list[_Call] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def forward(self, *args, **kwargs):
        self._calls = []  # a forward that was never backpropagated leaves nothing behind
        return self._module(*args, **kwargs)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            self._calls.append(_Call(module, args[0].detach(), output))

    def backward(self, loss_per_sample: Tensor) -> Tensor:
        """Add ``sum_i c_i grad(loss_i)`` to each trainable ``p.grad``, from one backward; return the norms.

        ``p.grad`` accumulates as after ``loss.backward()`` (virtual steps rely on the optimizer clearing it);
        a trainable weight the forward did not reach gets a zero gradient, so the optimizer sees every one.
        """
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("BookKeeping.backward: no forward pass through the wrapped model was recorded")
        batch = loss_per_sample.shape[0]
        grads = torch.autograd.grad(loss_per_sample.sum(), [c.output for c in calls], allow_unused=True)
        grouped: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
        for call, grad in zip(calls, grads, strict=True):
            if call.inputs.shape[0] != batch:
                raise RuntimeError(f"{type(call.module).__name__} saw a batch of {call.inputs.shape[0]}, not {batch}")
            if grad is not None:
                grouped.setdefault(call.module, []).append((call.inputs, grad))
        del calls, grads
        sq_norms = torch.zeros(batch, dtype=loss_per_sample.dtype, device=loss_per_sample.device)
        pending: list[Callable[[Tensor], None]] = []
        for module, pairs in grouped.items():
            sq, apply = _LAYERS[type(module)](module, pairs, self.norm_mode)
            sq_norms += sq.to(sq_norms.dtype)
            pending.append(apply)
        norms = sq_norms.sqrt()
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for apply in pending:
            apply(factors)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return norms

    def _close(self) -> None:
        """Remove the hooks (the model object is reused next round); named like Opacus' GradSampleModule's."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = []


def _trainable_layers(module: nn.Module) -> list[nn.Module]:
    """Every module owning a trainable weight; refuses unsupported types and weights two modules share."""
    layers: list[nn.Module] = []
    unsupported: list[str] = []
    owner: dict[int, tuple[str, nn.Module]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(m) not in SUPPORTED:
            unsupported.append(f"{name} ({type(m).__name__})")
            continue
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            unsupported.append(f"{name} (Embedding with max_norm, scale_grad_by_freq or sparse)")
            continue
        for p in own:  # one module reached under two names is fine (its calls are grouped); two modules are not
            first, first_module = owner.setdefault(id(p), (name, m))
            if first_module is not m:
                unsupported.append(f"{name} (weight shared with {first})")
        if m not in layers:
            layers.append(m)
    if unsupported:
        raise ValueError(
            "book-keeping clipping supports trainable Linear, Embedding and LayerNorm only; found "
            + ", ".join(unsupported[:6])
            + (", ..." if len(unsupported) > 6 else "")
        )
    return layers


def _ghost(norm_mode: str, ghost_cost: int, per_sample_cost: int) -> bool:
    return norm_mode == "ghost" or (norm_mode == "auto" and ghost_cost <= per_sample_cost)


def _accumulate(p: nn.Parameter, grad: Tensor) -> None:
    if p.grad is None:
        p.grad = grad.reshape(p.shape).contiguous()
    else:
        p.grad += grad.reshape(p.shape)


def _tokens(tensors: list[Tensor], batch: int, *tail: int) -> Tensor:
    """(B, tokens, *tail): every call's tokens are one example's sequence; no copy for a single call."""
    shaped = [x.reshape(batch, -1, *tail) for x in tensors]
    return shaped[0] if len(shaped) == 1 else torch.cat(shaped, dim=1)


def _weighted_sum(factors: Tensor, per_sample: Tensor) -> Tensor:
    return torch.tensordot(factors.to(per_sample.dtype), per_sample, dims=([0], [0]))


def _linear(m: nn.Linear, pairs: list[tuple[Tensor, Tensor]], norm_mode: str) -> Pending:
    """y = a W^T + b on (B, ..., d_in): every call's tokens are one example's sequence (concatenated)."""
    b = pairs[0][0].shape[0]
    a = _tokens([x for x, _ in pairs], b, pairs[0][0].shape[-1])
    g = _tokens([y for _, y in pairs], b, pairs[0][1].shape[-1])
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    sq = torch.zeros(b, dtype=g.dtype, device=g.device)
    weight = m.weight if m.weight.requires_grad else None
    bias_ps = g.sum(1) if m.bias is not None and m.bias.requires_grad else None
    if bias_ps is not None:
        sq += bias_ps.square().sum(1)
    per_sample = None
    if weight is not None:
        if t == 1:  # a single token: the per-example gradient is an outer product, its norm a product of norms
            sq += a.square().sum((1, 2)) * g.square().sum((1, 2))
        elif _ghost(norm_mode, 2 * t * t, d_in * d_out):
            gram_a, gram_g = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
            sq += torch.bmm(gram_a.reshape(b, 1, t * t), gram_g.reshape(b, t * t, 1)).reshape(b)
        else:
            per_sample = torch.bmm(g.transpose(1, 2), a)  # (B, d_out, d_in)
            sq += per_sample.square().sum((1, 2))

    def apply(factors: Tensor) -> None:
        if weight is not None:
            if per_sample is not None:
                grad = _weighted_sum(factors, per_sample)
            elif d_in < d_out:  # scale the narrower of the two: sum_i c_i g_i^T a_i = g^T (c a) = (c g)^T a
                grad = g.reshape(-1, d_out).t() @ (a * factors.to(a.dtype)[:, None, None]).reshape(-1, d_in)
            else:
                grad = (g * factors.to(g.dtype)[:, None, None]).reshape(-1, d_out).t() @ a.reshape(-1, d_in)
            _accumulate(weight, grad)
        if bias_ps is not None:
            _accumulate(m.bias, _weighted_sum(factors, bias_ps))

    return sq, apply


def _embedding(m: nn.Embedding, pairs: list[tuple[Tensor, Tensor]], norm_mode: str) -> Pending:
    """Row ``ids[t]`` of the table gets ``g[t]``; two tokens of one example with the same id add up."""
    b = pairs[0][0].shape[0]
    ids = _tokens([x for x, _ in pairs], b)
    g = _tokens([y for _, y in pairs], b, m.embedding_dim)
    if m.padding_idx is not None:  # the padding row never gets a gradient (nn.Embedding's own rule)
        g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
    t, (rows, dim) = ids.shape[1], m.weight.shape
    per_sample = None
    if _ghost(norm_mode, t, rows):
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        sq = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
    else:  # small tables (token types): the per-example gradient is cheap to hold
        per_sample = torch.zeros((b, rows, dim), dtype=g.dtype, device=g.device)
        per_sample.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, dim), g)
        sq = per_sample.square().sum((1, 2))

    def apply(factors: Tensor) -> None:
        if per_sample is not None:
            grad = _weighted_sum(factors, per_sample)
        else:
            scaled = (g * factors.to(g.dtype)[:, None, None]).reshape(-1, dim)
            grad = torch.zeros_like(m.weight).index_add_(0, ids.reshape(-1), scaled)
        _accumulate(m.weight, grad)

    return sq, apply


def _layer_norm(m: nn.LayerNorm, pairs: list[tuple[Tensor, Tensor]], _norm_mode: str) -> Pending:
    """Per-example gradients are sums over tokens of ``g * x_hat`` and ``g``: small, always materialised."""
    b, shape = pairs[0][0].shape[0], tuple(m.normalized_shape)
    x = _tokens([v for v, _ in pairs], b, *shape)
    g = _tokens([y for _, y in pairs], b, *shape)
    per_sample: list[tuple[nn.Parameter, Tensor]] = []
    if m.weight is not None and m.weight.requires_grad:
        per_sample.append((m.weight, (g * F.layer_norm(x, shape, eps=m.eps)).sum(1)))
    if m.bias is not None and m.bias.requires_grad:
        per_sample.append((m.bias, g.sum(1)))
    sq = torch.zeros(b, dtype=g.dtype, device=g.device)
    for _, ps in per_sample:
        sq += ps.reshape(b, -1).square().sum(1)

    def apply(factors: Tensor) -> None:
        for p, ps in per_sample:
            _accumulate(p, _weighted_sum(factors, ps))

    return sq, apply


_LAYERS: dict[type, Callable[[nn.Module, list[tuple[Tensor, Tensor]], str], Pending]] = {
    nn.Linear: _linear,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
}


class ClippedLoss:
    """The mean loss as the training loop uses it; ``backward()`` runs the one clipping backward pass."""

    def __init__(self, clipper: BookKeeping, loss_per_sample: Tensor):
        self.clipper = clipper
        self.loss_per_sample = loss_per_sample

    def backward(self) -> None:
        self.clipper.backward(self.loss_per_sample)

    def detach(self) -> Tensor:
        return self.loss_per_sample.detach().mean()

    def item(self) -> float:
        return float(self.detach())


class ClippedCriterion:
    """``criterion`` evaluated per example (``reduction='none'``), wrapped so ``.backward()`` clips."""

    def __init__(self, clipper: BookKeeping, criterion: nn.Module):
        self.clipper = clipper
        self.criterion = copy.copy(criterion)
        self.criterion.reduction = "none"

    def __call__(self, *args, **kwargs) -> ClippedLoss:
        return ClippedLoss(self.clipper, self.criterion(*args, **kwargs))


class BookKeepingOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for a clipped sum in ``p.grad`` (ghost mode's), without three copies of the model.

    Opacus zero-fills every ``p.grad`` (``set_to_none=False``), deep-copies it into ``summed_grad`` and, in
    ``_generate_noise``, fills a zero tensor per parameter before drawing the noise: on MiniLM each is a
    22.7 M-value pass per step. Here ``p.grad`` is cleared to ``None`` (the clipping backward writes a fresh
    one), a physical batch's ``p.grad`` becomes ``summed_grad`` without a copy, and the noise comes from the
    very call Opacus makes (``torch.normal(0, noise_multiplier * max_grad_norm, shape, generator)``, so the
    same values for the same generator) and is added in place. Averaging, virtual steps and the step hook
    are Opacus' own; secure mode is left to Opacus entirely.
    """

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=True)

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad  # zero_grad drops p.grad, so this tensor is summed_grad's alone
            else:
                p.summed_grad.add_(p.grad)

    def add_noise(self) -> None:
        if self.secure_mode:
            super().add_noise()
            return
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std != 0:  # Opacus draws nothing for std 0 either
                shape, device = p.summed_grad.shape, p.summed_grad.device
                p.summed_grad.add_(torch.normal(mean=0, std=std, size=shape, device=device, generator=self.generator))
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int = 1,
    noise_generator: torch.Generator | None = None,
    norm_mode: str = "auto",
) -> tuple[BookKeeping, BookKeepingOptimizer, ClippedCriterion]:
    """(model, optimizer, criterion) as Opacus' ``make_private`` returns them in ghost mode, minus the loader.

    The optimizer is Opacus' (noise, averaging, virtual steps, step hook: :class:`BookKeepingOptimizer`); the
    caller attaches the accountant hook and keeps its own Poisson loader, exactly as for the other modes.
    """
    ModuleValidator.validate(module, strict=True)
    clipper = BookKeeping(module, max_grad_norm=max_grad_norm, norm_mode=norm_mode)
    dp_optimizer = BookKeepingOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
    )
    return clipper, dp_optimizer, ClippedCriterion(clipper, criterion)
