"""A run's output is a usable model: export, a plain transformers pipeline, the model card, predict.

One real federated run (a local RoBERTa-family checkpoint, LoRA, DP, SecAgg+) feeds every test, so the
exported logits are compared with the model the coordinator actually checkpointed.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm import checkpoint
from fedllm.audit import audit
from fedllm.cli import main
from fedllm.data import load_federated
from fedllm.export import load_run_model
from fedllm.ledger import Ledger
from fedllm.model import load_tokenizer
from fedllm.training import forward

TINY = Path(__file__).resolve().parents[1] / "simulations" / "tiny.toml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from test_model_families import make_checkpoint

    root = tmp_path_factory.mktemp("export")
    base = make_checkpoint("roberta", root / "roberta-base")
    scenario = root / "s.toml"
    text = (
        TINY.read_text().replace('name = "tiny-bert"', f'name = "{base}"').replace("num_clients = 3", "num_clients = 2")
    )
    scenario.write_text(text.replace("local_steps = 5", "local_steps = 3"))
    out = root / "run"
    assert main(["simulate", str(scenario), "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def merged(run_dir) -> Path:
    out = run_dir.parent / "merged"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def adapter(run_dir) -> Path:
    out = run_dir.parent / "adapter"
    assert main(["export", str(run_dir), "--out", str(out), "--adapter"]) == 0
    return out


def _texts(run_dir: Path) -> list[str]:
    rm = load_run_model(run_dir)
    fed = load_federated(rm.config.data, rm.config.client_ids, rm.config.seed)
    return list(fed.central_test.texts[:24])


def _run_logits(run_dir: Path, texts: list[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The final global model as the coordinator evaluates it (fedllm's own forward, per text)."""
    rm = load_run_model(run_dir)
    tok = load_tokenizer(rm.config.model.name)
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = tok([t], truncation=True, max_length=rm.config.model.max_length, return_tensors="pt")
            rows.append(forward(rm.model, ids["input_ids"], ids["attention_mask"])[0])
    return torch.stack(rows), rm.labels


def _pipeline_logits(classify, texts: list[str], labels: tuple[str, ...]) -> torch.Tensor:
    out = classify(texts, top_k=None, function_to_apply="none", truncation=True)
    return torch.tensor([[{s["label"]: s["score"] for s in row}[name] for name in labels] for row in out])


def test_checkpoint_stores_names_and_labels(run_dir):
    ckpt = checkpoint.load(run_dir)
    assert ckpt.fmt == checkpoint.FORMAT
    assert len(ckpt.names) == len(ckpt.arrays)
    assert any("lora_A" in n for n in ckpt.names) and any("classifier" in n for n in ckpt.names)
    assert ckpt.labels == ("finance", "health", "sports", "weather")


def test_merged_export_loads_in_a_plain_pipeline_with_the_run_logits(run_dir, merged):
    from transformers import pipeline

    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "finance", "1": "health", "2": "sports", "3": "weather"}
    assert config["label2id"]["weather"] == 3
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    texts = _texts(run_dir)
    ours, labels = _run_logits(run_dir, texts)
    theirs = _pipeline_logits(pipeline("text-classification", model=str(merged)), texts, labels)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert ours.abs().max() > 0  # not a degenerate all-zero head


def test_adapter_export_names_its_base_and_gives_the_run_logits(run_dir, adapter):
    from fedllm.predict import load_pipeline

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((run_dir.parent / "roberta-base").resolve())
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) == {"query", "value"}
    assert (adapter / "adapter_model.safetensors").stat().st_size < 200_000  # the adapter, not the base
    texts = _texts(run_dir)
    ours, labels = _run_logits(run_dir, texts)
    theirs = _pipeline_logits(load_pipeline(adapter), texts, labels)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def _card_rows(card: str) -> dict[str, list[str]]:
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| client-"):
            rows[cells[0]] = cells
    return rows


def test_model_card_epsilons_match_the_ledger(run_dir, merged):
    card = (merged / "README.md").read_text()
    rows = _card_rows(card)
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        entries = ledger.entries()
        assert set(rows) == {e.client_id for e in entries}
        for cid, cells in rows.items():
            last = ledger.entries(client_id=cid, status="trained")[-1]
            assert float(cells[1]) == pytest.approx(last.epsilon, rel=1e-3)  # final epsilon
            assert float(cells[2]) == last.delta
            assert float(cells[3]) == pytest.approx(last.budget_epsilon)
            assert 0 < last.epsilon <= last.budget_epsilon
    assert f"head hash `{entries[-1].hash}`" in card
    assert f"**{audit(run_dir).verdict()}**" in card
    assert "Accountant: `prv`" in card and "add_remove" in card
    assert re.search(r"^\| 2 \| 0\.\d+ \|", card, re.M)  # accuracy of the last round
    assert "Not covered" in card and "group privacy" in card


def test_predict_text_file_and_errors(run_dir, merged, tmp_path, capsys):
    capsys.readouterr()
    assert main(["predict", str(merged), "--text", "the storm and rain forecast"]) == 0
    label, score, _text = capsys.readouterr().out.strip().split("\t")
    assert label in ("finance", "health", "sports", "weather") and 0.25 <= float(score) <= 1
    texts = _texts(run_dir)[:5]
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "body"], *[[i, t] for i, t in enumerate(texts)]])
    out = tmp_path / "out.csv"
    assert main(["predict", str(merged), "--file", str(src), "--text-column", "body", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    ours, labels = _run_logits(run_dir, texts)
    assert [r["label"] for r in rows] == [labels[i] for i in ours.argmax(-1).tolist()]
    for r in rows:
        probs = [float(r[f"score:{name}"]) for name in labels]
        assert sum(probs) == pytest.approx(1, abs=1e-4) and float(r["score"]) == pytest.approx(max(probs), abs=1e-6)
    capsys.readouterr()
    for argv, needle in [
        (["predict", str(run_dir), "--text", "x"], "not a model directory"),
        (["predict", str(merged), "--file", str(src), "--text-column", "nope"], "no column 'nope'"),
        (["predict", str(merged), "--file", str(src)], "needs --text-column"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_export_refuses_an_old_unnamed_checkpoint_and_a_used_out_dir(run_dir, merged, tmp_path, capsys):
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("clients"))
    ckpt = checkpoint.load(old)
    with np.load(old / checkpoint.FILE) as data:  # rewrite as format 1: arrays and the old meta only
        meta = json.loads(str(data["meta"]))
    legacy = {k: meta[k] for k in ("round", "run_id", "config_hash", "arrays_hash")}
    np.savez(
        old / checkpoint.FILE, meta=np.array(json.dumps(legacy)), **{f"arr_{i}": a for i, a in enumerate(ckpt.arrays)}
    )
    legacy_ckpt = checkpoint.load(old)  # still readable (``--resume`` needs only the arrays)
    assert legacy_ckpt.fmt == 1 and legacy_ckpt.names == () and len(legacy_ckpt.arrays) == len(ckpt.arrays)
    capsys.readouterr()
    assert main(["export", str(old), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "older fedllm without parameter names" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(run_dir), "--out", str(merged)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
