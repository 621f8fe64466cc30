"""``fedllm predict MODEL_DIR``: labels and scores from an exported model, the way a server would serve it.

It loads the directory with plain ``transformers`` (and ``peft`` for an adapter export), exactly as a user
without fedllm would, so what it prints is what a deployed ``pipeline`` returns. Scores are softmax
probabilities over the model's labels.

Custom code: a directory whose ``config.json`` has an ``auto_map`` asks its loader to run Python from the
directory (``trust_remote_code=True``). ``predict`` never runs code from a directory it is pointed at. A
head-mode export of fedllm is the one kind it loads: only when its code files are byte-identical (SHA-256) to
the ones this fedllm writes (:mod:`fedllm.export_head`), and then with fedllm's own copy of those classes,
so what runs is the installed fedllm and nothing read from the directory. Any other custom code is refused
with one line; read it and load it with ``transformers`` yourself if you trust it.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError, FedllmError

CSV_ENCODING = "utf-8-sig"  # a BOM from a spreadsheet export is not part of the first column's name


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    score: float
    scores: dict[str, float]  # every label's probability


def _is_model_dir(path: Path) -> str | None:
    """'merged', 'adapter', 'head' (fedllm's custom head-mode code) or None; refuses any other custom code."""
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if not (path / "config.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FedllmError(f"{path / 'config.json'}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not config.get("auto_map"):
        return "merged"
    _check_fedllm_code(path, config)
    return "head"


def _check_fedllm_code(path: Path, config: dict[str, Any]) -> None:
    """Pass only for fedllm's head-mode code, unchanged; anything else is one line naming what differs."""
    from fedllm import export_head

    refuse = f"{path}: config.json asks to run custom code (auto_map) that fedllm predict will not run:"
    if config.get("model_type") != "fedllm-head" or config["auto_map"] != export_head.AUTO_MAP:
        raise FedllmError(f"{refuse} it is not a fedllm head-mode export; if you trust it, load it with transformers")
    ours, theirs = export_head.code_hashes(), export_head.code_hashes(path)
    differ = [name for name in export_head.CODE_FILES if theirs[name] != ours[name]]
    if differ:
        recorded = config.get("fedllm_code_sha256") or {}
        why = (
            "differ from this fedllm's (they match config.json's fedllm_code_sha256: another fedllm version?"
            " export the run again with this one)"
            if all(theirs[n] == recorded.get(n) for n in differ)
            else "changed since fedllm wrote it, or missing"
        )
        raise FedllmError(f"{refuse} {', '.join(differ)} {why}")


def load_pipeline(model_dir: Path):
    """A ``text-classification`` pipeline over ``model_dir``; one line naming the directory if it is no model."""
    model_dir = Path(model_dir)
    kind = _is_model_dir(model_dir) if model_dir.is_dir() else None
    if kind is None:
        what = "does not exist" if not model_dir.exists() else "has no config.json or adapter_config.json"
        raise FedllmError(f"{model_dir}: not a model directory ({what}); give the --out of `fedllm export`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if kind == "head":  # fedllm's own copy of the code the directory holds (checked identical above)
        from fedllm.export_head import register_auto_classes

        register_auto_classes()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        if kind in ("merged", "head"):
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False)
        else:
            from peft import AutoPeftModelForSequenceClassification

            from fedllm.export import LABELS

            maps = json.loads((model_dir / LABELS).read_text())
            id2label = {int(k): v for k, v in maps["id2label"].items()}
            model = AutoPeftModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=len(id2label), id2label=id2label, label2id=maps["label2id"]
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedllmError(f"{model_dir}: cannot load the model ({reason})") from exc
    model.eval()
    return pipeline("text-classification", model=model, tokenizer=tokenizer)


def predict(model_dir: Path, texts: list[str], batch_size: int = 32) -> list[Prediction]:
    if not texts:
        return []
    classify = load_pipeline(model_dir)
    outputs = classify(texts, top_k=None, truncation=True, batch_size=batch_size)
    result = []
    for text, scores in zip(texts, outputs, strict=True):
        by_label = {s["label"]: float(s["score"]) for s in scores}
        best = max(scores, key=lambda s: s["score"])
        result.append(Prediction(text=text, label=best["label"], score=float(best["score"]), scores=by_label))
    return result


def read_texts(path: Path, column: str) -> list[str]:
    """The ``column`` of a CSV file, row by row; a missing column or an empty cell is one clear line."""
    try:
        with open(path, newline="", encoding=CSV_ENCODING) as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or column not in reader.fieldnames:
                have = ", ".join(reader.fieldnames or []) or "none"
                raise ConfigError(f"{path}: no column '{column}' (columns: {have})")
            texts = []
            for row in reader:
                value = row.get(column)
                if value is None or not value.strip():
                    raise ConfigError(f"{path}: row {reader.line_num}: empty '{column}'")
                texts.append(value)
            return texts
    except FileNotFoundError:
        raise ConfigError(f"--file: {path} not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def write_predictions(predictions: list[Prediction], out: Path | None) -> None:
    """CSV (``--out x.csv``), JSON Lines (any other ``--out``), or tab-separated lines on stdout."""
    if out is None:
        for p in predictions:
            print(f"{p.label}\t{p.score:.4f}\t{p.text}")
        return
    labels = list(predictions[0].scores) if predictions else []
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label", "score", *[f"score:{name}" for name in labels]])
            for p in predictions:
                writer.writerow([p.text, p.label, f"{p.score:.6f}", *[f"{p.scores[n]:.6f}" for n in labels]])
    else:
        with open(out, "w", encoding="utf-8") as fh:
            for p in predictions:
                row: dict[str, Any] = {"text": p.text, "label": p.label, "score": p.score, "scores": p.scores}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
