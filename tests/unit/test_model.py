"""Any BERT-family encoder trains under DP in every mode; a checkpoint whose weights do not fit is refused.

Each family's checkpoint is built here, offline: a tiny random encoder saved with ``save_pretrained`` beside
the MiniLM tokenizer, so loading goes through ``AutoModelForSequenceClassification`` exactly as a user's
checkpoint would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import make_checkpoint

from fedllm.accounting import make_accountant
from fedllm.config import ModelConfig, from_dict
from fedllm.errors import ConfigError
from fedllm.model import build_model, count_parameters, get_trainable, load_tokenizer
from fedllm.training import DPSettings, TokenizedDataset, forward, train_dp

FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2", "electra")
MODES = ("lora", "last-layers", "full")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_checkpoint(f, root / f) for f in FAMILIES}


def _train_one_round(model, data, mode: str):
    accountant = make_accountant("prv")
    result = train_dp(
        model,
        data,
        steps=2,
        batch_size=16,
        learning_rate=1e-2,
        dp=DPSettings(1.0, 1.0, mode),
        accountant=accountant,
        device=torch.device("cpu"),
    )
    return result, accountant


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_one_dp_round_in_each_mode(family, mode, checkpoints, tiny_texts):
    cfg = ModelConfig(name=str(checkpoints[family]), mode=mode, max_length=32)
    model = build_model(cfg, num_labels=2)
    base = model.get_base_model() if mode == "lora" else model
    assert base.config.model_type == family
    data = TokenizedDataset(tiny_texts, load_tokenizer(cfg.name), cfg.max_length)
    before = [a.copy() for a in get_trainable(model)]
    result, accountant = _train_one_round(model, data, mode)
    assert result.steps == 2
    assert [h[2] for h in accountant.history] == [2]  # both steps counted
    after = get_trainable(model)
    # every trainable tensor of the head moved: nothing that travels is left at its random start
    moved = [not torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(before, after, strict=True)]
    assert sum(moved) >= 1
    trainable, total = count_parameters(model)
    if mode == "full" and family != "deberta-v2":  # DeBERTa: see the batch-shared test below
        assert trainable == total
    else:
        assert 0 < trainable < total


def _per_example_grads_match(model, ids, mask, labels) -> None:
    """Opacus' per-sample gradients must equal each example's own gradient, computed alone."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    loss = torch.nn.functional.cross_entropy(forward(gsm, ids, mask), labels, reduction="sum")
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    batched = {n: p.grad_sample.detach().clone() for n, p in params}
    gsm._close()
    for _, p in params:
        p.grad = None
        for attr in ("grad_sample", "_forward_counter"):
            if hasattr(p, attr):
                delattr(p, attr)
    for i in range(len(labels)):
        model.zero_grad()
        single = torch.nn.functional.cross_entropy(forward(model, ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1])
        single.backward()
        for n, p in params:
            torch.testing.assert_close(batched[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{n}, example {i}")


@pytest.mark.parametrize("mode", ["lora", "last-layers"])
@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_per_example_gradients_are_each_examples_own(family, mode, checkpoints, tiny_texts):
    """The clipping bound holds only if row i of the per-sample gradient depends on example i alone.

    DeBERTa's relative-position path runs shared weights on a batch-of-one tensor; left trainable, Opacus
    broadcasts their batch gradient into every row (this test then fails). They are frozen instead.
    """
    model = build_model(ModelConfig(name=str(checkpoints[family]), mode=mode, max_length=32), num_labels=2)
    tok = load_tokenizer(str(checkpoints[family]))
    batch = tok(list(tiny_texts.texts[:3]), padding=True, return_tensors="pt")
    _per_example_grads_match(model, batch["input_ids"], batch["attention_mask"], torch.tensor([0, 1, 0]))


def test_deberta_relative_position_weights_are_frozen(checkpoints):
    from fedllm.model import _freeze_batch_shared

    full = build_model(ModelConfig(name=str(checkpoints["deberta-v2"]), mode="full"), num_labels=2)
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert "deberta.encoder.rel_embeddings.weight" in frozen
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" in frozen  # share_att_key
    assert "deberta.encoder.layer.0.attention.self.value_proj.weight" not in frozen
    bert = build_model(ModelConfig(name=str(checkpoints["bert"]), mode="full"), num_labels=2)
    assert _freeze_batch_shared(bert) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_family_attention_and_trains_the_whole_head(family, checkpoints):
    model = build_model(ModelConfig(name=str(checkpoints[family]), mode="lora"), num_labels=3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names)
    head = {"distilbert": ("pre_classifier", "classifier"), "deberta-v2": ("pooler", "classifier")}.get(
        family, ("classifier",)
    )
    for part in head:  # a head part left frozen would stay at its random initialisation
        assert any(f".{part}." in n and "modules_to_save" in n for n in names), (part, names)


def test_lora_targets_override_from_the_scenario(checkpoints):
    cfg = from_dict({"model": {"name": str(checkpoints["bert"]), "lora_targets": ["query", "key", "value"]}})
    assert cfg.model.lora_targets == ("query", "key", "value")
    model = build_model(cfg.model, num_labels=2)
    targeted = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert targeted == {"query", "key", "value"}
    with pytest.raises(ConfigError, match=r"model\.lora_targets"):
        from_dict({"model": {"lora_targets": []}})


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layers_unfreezes_only_the_last_blocks_and_the_head(family, checkpoints):
    model = build_model(ModelConfig(name=str(checkpoints[family]), mode="last-layers", last_layers=1), num_labels=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".layer.1." in n for n in names)
    assert not any(".layer.0." in n for n in names)
    assert not any("embeddings" in n for n in names)
    assert any(n.startswith("classifier") for n in names)


def test_roberta_positions_follow_the_padding_offset(checkpoints, tiny_texts):
    """The explicit ids must be what RoBERTa's own forward computes, else the logits differ."""
    model = build_model(ModelConfig(name=str(checkpoints["roberta"]), mode="full"), num_labels=2).eval()
    tok = load_tokenizer(str(checkpoints["roberta"]))
    batch = tok(list(tiny_texts.texts[:4]), padding=True, return_tensors="pt")
    batch["input_ids"][0, 3:] = 0  # a padded row
    batch["attention_mask"][0, 3:] = 0
    with torch.no_grad():
        ours = forward(model, batch["input_ids"], batch["attention_mask"])
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, own)


def test_a_builtin_keeps_its_exact_initial_weights():
    """tiny-bert is built from a fixed seed: every node must get the identical model."""
    a = get_trainable(build_model(ModelConfig(name="tiny-bert", mode="lora"), num_labels=2))
    b = get_trainable(build_model(ModelConfig(name="tiny-bert", mode="lora"), num_labels=2))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def _relabel(src: Path, dst: Path, family: str, architecture: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type=family, architectures=[architecture])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_roberta_weights_under_a_bert_config_are_refused_in_one_line(tmp_path):
    roberta = make_checkpoint("roberta", tmp_path / "roberta-mlm", masked_lm=True)
    wrong = _relabel(roberta, tmp_path / "says-bert", "bert", "BertForMaskedLM")
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=str(wrong), mode="lora"), num_labels=2)
    line = str(err.value)
    assert "\n" not in line
    assert str(wrong) in line
    assert "encoder weight(s) missing (bert.embeddings" in line
    assert "unused (roberta." in line


def test_bert_weights_under_a_roberta_config_are_refused(tmp_path):
    bert = make_checkpoint("bert", tmp_path / "bert-mlm", masked_lm=True)
    wrong = _relabel(bert, tmp_path / "says-roberta", "roberta", "RobertaForMaskedLM")
    with pytest.raises(ConfigError, match=r"missing \(roberta\.embeddings"):
        build_model(ModelConfig(name=str(wrong), mode="full"), num_labels=2)


def test_the_refusal_comes_before_any_budget_is_spent(tmp_path, capsys):
    """``fedllm simulate`` stops at preflight: no run directory, no ledger, no reservation."""
    from fedllm.cli import main

    roberta = make_checkpoint("roberta", tmp_path / "roberta-mlm", masked_lm=True)
    wrong = _relabel(roberta, tmp_path / "says-bert", "bert", "BertForMaskedLM")
    out = tmp_path / "run"
    argv = ["simulate", "--data", "synthetic", "--model", str(wrong), "--rounds", "1", "--clients", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedllm: error: model.name:") and len(err.splitlines()) == 1
    assert not out.exists()
