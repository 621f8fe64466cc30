"""The label-name head start: public names, the nodes' own encoder and pooling, the coordinator's model only."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedllm.config import ModelConfig, from_dict
from fedllm.errors import ConfigError
from fedllm.features import features
from fedllm.head_prior import LABEL_NAMES, SCALE, init_head, label_text
from fedllm.model import build_model, get_trainable

LABELS = ("card_arrival", "lost_or_stolen_card", "top_up_failed")


pytestmark = pytest.mark.usefixtures("own_feature_cache")  # each test embeds into its own cache


@pytest.mark.parametrize("mode", ["head", "head-lora"])
def test_rows_are_the_scaled_label_name_features(mode):
    cfg = ModelConfig(name="tiny-bert", mode=mode, head_rounds=1, max_length=32, head_init=LABEL_NAMES)
    model = build_model(cfg, num_labels=len(LABELS))
    init_head(model, cfg, LABELS)
    head = model.head.net if mode == "head-lora" else model.net
    expected = SCALE * features(cfg, ["card arrival", "lost or stolen card", "top up failed"])
    np.testing.assert_allclose(head.weight.detach().numpy(), expected, rtol=1e-6)
    assert not head.bias.detach().any()
    # the zero start is unchanged unless asked for
    plain = build_model(ModelConfig(name="tiny-bert", mode=mode, head_rounds=1, max_length=32), len(LABELS))
    before = [a.copy() for a in get_trainable(plain)]
    init_head(plain, ModelConfig(name="tiny-bert", mode=mode, head_rounds=1, max_length=32), LABELS)
    assert all((a == b).all() for a, b in zip(before, get_trainable(plain), strict=True))


def test_label_text_reads_like_words():
    assert label_text("apple_pay_or_google_pay") == "apple pay or google pay"
    assert label_text("Anatomy") == "Anatomy"


@pytest.mark.parametrize(
    ("model", "needle"),
    [({"mode": "lora"}, "mode head or head-lora"), ({"mode": "head", "head_hidden": 8}, "head_hidden = 0")],
)
def test_label_names_need_a_linear_head_on_pooled_features(model, needle):
    raw = {
        "name": "x",
        "model": {"name": "tiny-bert", "head_init": "label-names", **model},
        "data": {"source": "synthetic"},
    }
    with pytest.raises(ConfigError, match=rf"scenario.toml: model\.head_init.*{needle}"):
        from_dict(raw, source="scenario.toml")
    raw["model"] = {"name": "tiny-bert", "head_init": "names"}
    with pytest.raises(ConfigError, match=r"model\.head_init: must be one of zeros, label-names"):
        from_dict(raw, source="scenario.toml")


def test_the_coordinator_starts_a_new_run_from_the_label_names_and_a_resumed_one_from_its_checkpoint(tmp_path):
    from fedllm.apps.server import _start

    raw = {"name": "x", "model": {"name": "tiny-bert", "mode": "head", "max_length": 32, "head_init": "label-names"}}
    cfg = from_dict({**raw, "data": {"source": "synthetic"}})
    spec = SimpleNamespace(out_dir=tmp_path, config=cfg, resume=False, run_id="r", transport="simulation")
    model = build_model(cfg.model, num_labels=len(LABELS))
    _, initial, done = _start(spec, SimpleNamespace(run_id=1), model, LABELS)
    assert done == 0
    np.testing.assert_allclose(initial[0], SCALE * features(cfg.model, [label_text(n) for n in LABELS]), rtol=1e-6)
    assert torch.equal(model.net.weight, torch.from_numpy(initial[0]))
