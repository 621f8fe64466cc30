"""A run's output is a usable model: export, a plain transformers pipeline, the model card, predict.

One real federated run (a local RoBERTa-family checkpoint, LoRA, DP, SecAgg+) feeds the LoRA tests, and one
head-mode run (tiny-bert, DP, SecAgg+) the head tests, so the exported logits are compared with the model
the coordinator actually checkpointed.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm import checkpoint, export_head, features
from fedllm.audit.verify import audit
from fedllm.cli import main
from fedllm.data.federation import load_federated
from fedllm.export import load_run_model
from fedllm.ledger import Ledger
from fedllm.model import load_tokenizer
from fedllm.training import forward

TINY = Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from support import make_checkpoint

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
    ckpt = checkpoint.load(run_dir / "checkpoint.npz")
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
    assert f"Accountant: `{entries[-1].accountant}`" in card and "add_remove" in card
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
    ckpt = checkpoint.load(old / "checkpoint.npz")
    with np.load(old / "checkpoint.npz") as data:  # rewrite as format 1: arrays and the old meta only
        meta = json.loads(str(data["meta"]))
    legacy = {k: meta[k] for k in ("round", "run_id", "config_hash", "arrays_hash")}
    np.savez(
        old / "checkpoint.npz", meta=np.array(json.dumps(legacy)), **{f"arr_{i}": a for i, a in enumerate(ckpt.arrays)}
    )
    legacy_ckpt = checkpoint.load(old / "checkpoint.npz")  # still readable (``--resume`` needs only the arrays)
    assert legacy_ckpt.fmt == 1 and legacy_ckpt.names == () and len(legacy_ckpt.arrays) == len(ckpt.arrays)
    capsys.readouterr()
    assert main(["export", str(old), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "older fedllm without parameter names" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(run_dir), "--out", str(merged)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


# --- head mode: a frozen encoder's pooled features and a trained head, shipped with its own model code ---


@pytest.fixture(scope="module")
def head_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-head") / "run"
    assert main(["simulate", str(TINY), "--mode", "head", "--clients", "2", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def head_model(head_run) -> Path:
    out = head_run.parent / "model"
    assert main(["export", str(head_run), "--out", str(out)]) == 0
    return out


def _head_texts(run_dir: Path) -> list[str]:
    long = " ".join(["the storm and rain forecast for the sports finance health week"] * 12)  # > max_length
    return [*_texts(run_dir), long, "x"]


def _head_run_logits(run_dir: Path, texts: list[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The final global head on fedllm's own features of the texts: what every node and the coordinator use."""
    rm = load_run_model(run_dir)
    with torch.no_grad():
        return rm.model(torch.from_numpy(features.features(rm.config.model, texts))), rm.labels


# What a consumer runs: no fedllm imported, offline, the directory's own code through trust_remote_code.
CONSUMER = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
model_dir, texts = sys.argv[1], json.loads(sys.argv[2])
out = pipeline("text-classification", model=model_dir, trust_remote_code=True)(
    texts, top_k=None, function_to_apply="none", truncation=True
)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # transformers 5 reads config.json first
with torch.no_grad():
    direct = model(**tok(texts[:2], truncation=True, padding=True, return_tensors="pt")).logits.tolist()
assert not any(m == "fedllm" or m.startswith("fedllm.") for m in sys.modules), "fedllm was imported"
print(json.dumps({"pipeline": out, "direct": direct, "class": type(model).__module__, "training": model.training}))
"""


def _consume(model_dir: Path, texts: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(model_dir), json.dumps(texts)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_head_export_loads_offline_with_its_own_code_and_gives_the_run_logits(head_run, head_model, tmp_path):
    from safetensors import safe_open

    config = json.loads((head_model / "config.json").read_text())
    assert config["model_type"] == "fedllm-head" and config["auto_map"] == export_head.AUTO_MAP
    assert config["id2label"] == {"0": "finance", "1": "health", "2": "sports", "3": "weather"}
    assert config["label2id"]["weather"] == 3 and config["head_hidden"] == 0
    shipped = {n: hashlib.sha256((head_model / n).read_bytes()).hexdigest() for n in export_head.CODE_FILES}
    assert config["fedllm_code_sha256"] == shipped == export_head.code_hashes()
    for name in export_head.CODE_FILES:  # self-contained: the consumer has no fedllm
        assert "fedllm" not in re.findall(r"^\s*(?:from|import)\s+(\S+)", (head_model / name).read_text(), re.M)
    with safe_open(head_model / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        head_w = f.get_tensor("head.weight")
    assert {"head.weight", "head.bias"} <= keys and not any("pooler" in k for k in keys)
    assert any(k.startswith("encoder.encoder.layer.") for k in keys)
    assert (head_model / "tokenizer.json").is_file()
    torch.testing.assert_close(head_w, torch.from_numpy(checkpoint.load(head_run / "checkpoint.npz").arrays[0]))

    texts = _head_texts(head_run)
    ours, labels = _head_run_logits(head_run, texts)
    got = _consume(head_model, texts, tmp_path)
    assert got["class"].startswith("transformers_modules.") and got["training"] is False  # the directory's code
    theirs = torch.tensor([[{s["label"]: s["score"] for s in row}[name] for name in labels] for row in got["pipeline"]])
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got["direct"]), ours[:2], rtol=1e-4, atol=1e-4)  # padded batch
    assert ours.abs().max() > 1e-3  # the trained head, not the zero initial one

    card = (head_model / "README.md").read_text()
    assert "trust_remote_code=True" in card and "Loading needs `trust_remote_code=True`" in card
    assert all(f"| `{n}` | `{h}` |" in card for n, h in shipped.items())
    assert "head (merged export)" in card and "a linear layer" in card
    provenance = json.loads((head_model / "fedllm_export.json").read_text())
    assert provenance["mode"] == "head" and provenance["code_sha256"] == shipped


def test_head_predict_gives_the_run_label_and_runs_no_code_from_the_directory(head_run, head_model, tmp_path, capsys):
    text = _head_texts(head_run)[0]
    ours, labels = _head_run_logits(head_run, [text])
    capsys.readouterr()
    assert main(["predict", str(head_model), "--text", text]) == 0
    label, score, _ = capsys.readouterr().out.strip().split("\t")
    assert label == labels[int(ours.argmax())]
    assert float(score) == pytest.approx(float(torch.softmax(ours[0], -1).max()), abs=1e-4)

    canary = tmp_path / "ran"
    evil = f"import pathlib\npathlib.Path({str(canary)!r}).write_text('ran')\n"
    edited = tmp_path / "edited"  # fedllm's layout, one code file changed
    shutil.copytree(head_model, edited)
    with open(edited / "modeling_fedllm_head.py", "a") as fh:
        fh.write(evil)
    foreign = tmp_path / "foreign"  # someone else's remote code
    shutil.copytree(head_model, foreign)
    (foreign / "evil.py").write_text(evil + "class Evil: pass\n")
    config = json.loads((foreign / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.Evil"}
    (foreign / "config.json").write_text(json.dumps(config))
    for model_dir, needle in [
        (edited, "modeling_fedllm_head.py changed since fedllm wrote it"),
        (foreign, "not a fedllm head-mode export"),
    ]:
        capsys.readouterr()
        assert main(["predict", str(model_dir), "--text", text]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "will not run" in err, err
    assert not canary.exists()


def test_head_export_refuses_an_adapter(head_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(head_run), "--out", str(tmp_path / "a"), "--adapter"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "head-mode run" in err and "no LoRA" in err, err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_head_export_of_other_encoders_with_a_hidden_layer_gives_the_head_logits(head_run, family, tmp_path):
    """Another family's encoder (RoBERTa: no pooler in the body, padding-offset positions; ELECTRA: an
    embedding projection) under an MLP head (``model.head_hidden`` > 0, a random one here): every tensor lands
    where the shipped code reads it, and the logits are fedllm's features through the head."""
    from support import make_checkpoint

    from fedllm.export import _save_head_model, _tokenizer
    from fedllm.model import FeatureHead, hidden_size
    from fedllm.predict import load_pipeline

    rm = load_run_model(head_run)
    base = make_checkpoint(family, tmp_path / family)
    model_cfg = dataclasses.replace(rm.config.model, name=str(base), head_hidden=8)
    cfg = dataclasses.replace(rm.config, model=model_cfg)
    head = FeatureHead(hidden_size(model_cfg), len(rm.labels), hidden=8, seed=3).eval()
    out = tmp_path / "model"
    out.mkdir()
    _save_head_model(cfg, head, dict(enumerate(rm.labels)), {n: i for i, n in enumerate(rm.labels)}, out)
    _tokenizer(cfg).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["head_hidden"] == 8 and config["feature_encoder"]["model_type"] == family
    texts = _head_texts(head_run)
    with torch.no_grad():
        ours = head(torch.from_numpy(features.features(model_cfg, texts)))
    theirs = _pipeline_logits(load_pipeline(out), texts, rm.labels)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 1e-2


# --- head-lora: the head first, then LoRA from it; exported with LoRA merged under the same pooled head ---


@pytest.fixture(scope="module")
def head_lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-head-lora") / "run"
    args = ["simulate", str(TINY), "--mode", "head-lora", "--head-rounds", "1", "--clients", "2", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    return out


def test_head_lora_export_merges_lora_and_gives_the_run_logits(head_lora_run, tmp_path, tokenizer):
    from fedllm.training import collate, forward

    out = tmp_path / "model"
    assert main(["export", str(head_lora_run), "--out", str(out)]) == 0
    assert main(["export", str(head_lora_run), "--adapter", "--out", str(tmp_path / "adapter")]) == 2
    rm = load_run_model(head_lora_run)
    lora_b = [p for n, p in rm.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # round 2 trained LoRA: the merge changes weights
    texts = _head_texts(head_lora_run)
    rows = [
        (torch.tensor(ids), torch.tensor(0)) for ids in tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    ]
    with torch.no_grad():
        ours = torch.cat([forward(rm.model, *collate([row], tokenizer.pad_token_id)[:2]) for row in rows])
    got = _consume(out, texts, tmp_path)
    theirs = torch.tensor([[{s["label"]: s["score"] for s in row}[n] for n in rm.labels] for row in got["pipeline"]])
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 1e-3
    provenance = json.loads((out / "fedllm_export.json").read_text())
    assert provenance["mode"] == "head-lora"
    assert "`head-lora` mode: a small head was trained first, then LoRA" in (out / "README.md").read_text()
