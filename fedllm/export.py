"""``fedllm export RUN_DIR --out DIR``: the run's final global model as a Hugging Face model directory.

The run directory holds the trainable tensors only (``checkpoint.npz``, by parameter name) and the config
that built the frozen rest. Export rebuilds the model exactly as every node did, loads the tensors by name,
and writes what ``transformers`` reads with no fedllm installed:

* ``--merged`` (default): LoRA folded into the weights; ``config.json`` (with ``id2label``/``label2id``),
  ``model.safetensors`` and the tokenizer. ``transformers.pipeline("text-classification", model=DIR)``.
* ``--adapter`` (LoRA runs only): a PEFT adapter (``adapter_config.json`` names the base checkpoint,
  ``adapter_model.safetensors`` holds LoRA and the whole head) plus the tokenizer and ``labels.json``;
  load with ``peft.AutoPeftModelForSequenceClassification.from_pretrained(DIR, num_labels=N)``.

A ``head``-mode run (a head on frozen, mean-pooled, L2-normalised encoder features; :mod:`fedllm.features`)
exports ``--merged`` only: the frozen encoder's weights and the head in one ``model.safetensors``. No stock
``transformers`` class pools that way, so the directory also holds the small model code of
:mod:`fedllm.export_head`, registered in ``config.json``'s ``auto_map``; a consumer loads it with
``trust_remote_code=True`` (the model card says why), and ``config.json`` records the code's SHA-256
(``fedllm_code_sha256``) so ``fedllm predict`` can tell fedllm's code from any other.

All carry ``README.md``, the model card (:mod:`fedllm.model_card`), and ``fedllm_export.json``, the
provenance (run, round, checkpoint hash) that ties the directory to the run's ledger.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fedllm import checkpoint
from fedllm.config import FederationConfig
from fedllm.errors import ConfigError, FedllmError
from fedllm.head_lora import HEAD_LORA
from fedllm.model import (
    TINY_BERT,
    build_model,
    checkpoint_source,
    frozen_encoder,
    load_tokenizer,
    set_trainable,
    trainable_names,
)
from fedllm.run.rundir import RunDir

PROVENANCE = "fedllm_export.json"
LABELS = "labels.json"
KINDS = ("merged", "adapter")
POOLED_MODES = ("head", HEAD_LORA)  # a head on mean-pooled, normalised features: exported with fedllm's code


@dataclass
class RunModel:
    """The run's final global model, rebuilt: ``model`` is in eval mode with the checkpoint's tensors.

    In head mode ``model`` is the :class:`fedllm.model.FeatureHead` alone; its input is
    :func:`fedllm.features.features` of the texts, as on every node.
    """

    config: FederationConfig
    model: nn.Module
    labels: tuple[str, ...]
    ckpt: checkpoint.Checkpoint


def load_run_model(run_dir: Path) -> RunModel:
    """Rebuild the model every node built and load the last checkpoint into it, matched by name."""
    rd = RunDir(Path(run_dir))
    cfg_path = rd.config_path
    if not cfg_path.is_file():
        raise FedllmError(f"{run_dir}: no {cfg_path.name} here; not a fedllm run directory")
    cfg = rd.read_config()
    ckpt = rd.read_checkpoint()
    checkpoint.require_names(ckpt, rd.checkpoint_path)
    model = build_model(cfg.model, len(ckpt.labels))
    names = trainable_names(model)
    if names != list(ckpt.names):
        differ = next((f"{a} vs {b}" for a, b in zip(names, ckpt.names, strict=False) if a != b), "their number")
        raise FedllmError(
            f"{rd.checkpoint_path}: its {len(ckpt.names)} tensors do not match the {len(names)} trainable"
            f" tensors {cfg_path.name} builds (first difference: {differ}); was the base checkpoint changed?"
        )
    set_trainable(model, ckpt.arrays)
    model.eval()
    return RunModel(config=cfg, model=model, labels=ckpt.labels, ckpt=ckpt)


def _label_maps(labels: tuple[str, ...]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}


def _tokenizer(cfg: FederationConfig):
    """A copy (the loaded one is cached and shared) that truncates as training did."""
    tok = copy.deepcopy(load_tokenizer(cfg.model.name))
    tok.model_max_length = cfg.model.max_length
    return tok


def _require_head_pooling() -> None:
    """The shipped code computes one feature recipe; a run whose features differ would export another model."""
    from fedllm import features
    from fedllm.export_head.configuration_fedllm_head import FedllmHeadConfig

    if features.POOLING != FedllmHeadConfig().pooling:
        raise FedllmError(
            f"export: the run's features are '{features.POOLING}' but fedllm/export_head computes"
            f" '{FedllmHeadConfig().pooling}'; the exported model would not be the run's"
        )


def _pooled_parts(cfg: FederationConfig, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder, head) of a pooled-head run: head mode's frozen encoder, or head-lora's with LoRA merged in."""
    if cfg.model.mode == HEAD_LORA:
        return copy.deepcopy(model.encoder).merge_and_unload(), model.head
    return frozen_encoder(cfg.model), model


def _save_head_model(
    cfg: FederationConfig, model: nn.Module, id2label: dict[int, str], label2id: dict[str, int], out: Path
) -> dict[str, str | None]:
    """The encoder the run's features came from, plus its head, as one model of fedllm's shipped code.

    The weights are loaded strictly by name (a missing or extra tensor is an error, never a random init) and
    the pooler, which mean-pooled features never use, is left out. Returns the code files' SHA-256.
    """
    from fedllm import export_head
    from fedllm.export_head.configuration_fedllm_head import FedllmHeadConfig
    from fedllm.export_head.modeling_fedllm_head import FedllmHeadForSequenceClassification

    _require_head_pooling()
    body, head = _pooled_parts(cfg, model)
    encoder_config = body.config.to_dict()
    for key in ("architectures", "id2label", "label2id", "_name_or_path", "transformers_version"):
        encoder_config.pop(key, None)
    code = export_head.code_hashes()
    config = FedllmHeadConfig(
        feature_encoder=encoder_config,
        head_hidden=cfg.model.head_hidden,
        id2label=id2label,
        label2id=label2id,
        architectures=["FedllmHeadForSequenceClassification"],
        auto_map=dict(export_head.AUTO_MAP),
        fedllm_code_sha256=code,
    )
    model = FedllmHeadForSequenceClassification(config)
    weights = {f"encoder.{k}": v for k, v in body.state_dict().items() if not k.startswith("pooler.")}
    weights |= {f"head.{k}": v for k, v in head.net.state_dict().items()}
    model.load_state_dict(weights, strict=True)
    model.eval()
    model.save_pretrained(out)
    for name in export_head.CODE_FILES:
        shutil.copyfile(export_head.HERE / name, out / name)
    return code


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} already exists and is not an empty directory; choose another")
    out.mkdir(parents=True, exist_ok=True)


def export(run_dir: Path, out: Path, kind: str = "merged") -> Path:
    """Write the model directory ``out``; returns it. Nothing is written if the run cannot be exported."""
    if kind not in KINDS:
        raise ConfigError(f"export: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    run_dir, out = Path(run_dir), Path(out)
    rm = load_run_model(run_dir)
    cfg, model = rm.config, rm.model
    is_lora = cfg.model.mode == "lora"
    pooled = cfg.model.mode in POOLED_MODES
    if kind == "adapter":
        if cfg.model.mode == "head":
            raise ConfigError("--adapter: a head-mode run trained a head on a frozen encoder, no LoRA; export --merged")
        if cfg.model.mode == HEAD_LORA:
            raise ConfigError(
                "--adapter: a head-lora run's head reads pooled features, which no adapter format describes;"
                " export --merged"
            )
        if not is_lora:
            raise ConfigError(f"--adapter: the run trained in '{cfg.model.mode}' mode, not LoRA; export --merged")
        if cfg.model.name == TINY_BERT:
            raise ConfigError("--adapter: tiny-bert is built in memory and has no checkpoint to name as the base")
    from fedllm.model_card import render_model_card

    if pooled:
        _require_head_pooling()
    id2label, label2id = _label_maps(rm.labels)
    _prepare_out(out)
    base_path = str(Path(checkpoint_source(cfg.model.name)).resolve()) if cfg.model.name != TINY_BERT else TINY_BERT
    code: dict[str, str | None] | None = None
    if pooled:
        code = _save_head_model(cfg, model, id2label, label2id, out)
    elif kind == "merged":
        plain = model.merge_and_unload() if is_lora else model
        plain.config.id2label, plain.config.label2id = id2label, label2id
        plain.config.architectures = [type(plain).__name__]
        plain.save_pretrained(out)
    else:
        model.get_base_model().config.id2label = id2label
        model.get_base_model().config.label2id = label2id
        model.peft_config["default"].base_model_name_or_path = base_path
        model.save_pretrained(out)
        (out / LABELS).write_text(json.dumps({"id2label": id2label, "label2id": label2id}, indent=2) + "\n")
    _tokenizer(cfg).save_pretrained(out)
    provenance: dict[str, Any] = {
        "format": kind,
        "run_dir": str(run_dir.resolve()),
        "run_id": rm.ckpt.run_id,
        "round": rm.ckpt.round,
        "config_hash": rm.ckpt.config_hash,
        "base_model": base_path,
        "mode": cfg.model.mode,
        "max_length": cfg.model.max_length,
        "labels": list(rm.labels),
    }
    if code is not None:
        provenance["head_hidden"] = cfg.model.head_hidden
        provenance["code_sha256"] = code
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "README.md").write_text(render_model_card(run_dir, provenance), encoding="utf-8")
    return out
