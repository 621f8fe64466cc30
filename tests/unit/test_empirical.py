"""The one-run empirical audit (fedllm/audit/canaries.py and its neighbours): the bound itself, and the parts.

The bound is checked against numbers: values printed in Steinke, Nasr, Jagielski (arXiv:2305.08846v1,
Appendix D and Section 7), the closed form when delta = 0, monotonicity, and chance-level guessing.
The three runs that must come out right are in ``tests/system/test_empirical_run.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from support import EMPIRICAL_SCENARIO

from fedllm.audit.canaries import make_canaries, prepare
from fedllm.audit.empirical_attack import black_box_scores, guess
from fedllm.audit.empirical_bound import epsilon_lower_bound, p_value
from fedllm.config import from_dict
from fedllm.data.federation import federation_data
from fedllm.errors import ConfigError
from fedllm.node_assets import with_extra_rows
from fedllm.run.rundir import ClientDir, RunDir
from fedllm.run.spec import RunSpec

# ---------------------------------------------------------------------------------------------- the bound


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "published"),
    [
        (1000, 100, 75, 1e-4, 0.673),  # arXiv:2305.08846v1 Appendix D, the example under get_eps_audit
        (100000, 1510, 1439, 1e-5, 2.675),  # ibid. Section 7 (Figure 11), printed to 3 decimals
    ],
)
def test_bound_reproduces_the_papers_numbers(m, r, v, delta, published):
    assert epsilon_lower_bound(m, r, v, delta, 0.95) == pytest.approx(published, abs=1e-3)


@pytest.mark.parametrize("k", [10, 40, 100])
def test_all_guesses_correct_with_delta_zero_has_a_closed_form(k):
    """delta = 0: P[Binomial(k, q) >= k] = q^k < 0.05 exactly when q < 0.05^(1/k), so eps = logit(0.05^(1/k))."""
    q = 0.05 ** (1 / k)
    assert epsilon_lower_bound(1000, k, k, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    m, r = 200, 40
    bounds = [epsilon_lower_bound(m, r, v, 1e-5) for v in range(r + 1)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[r // 2] == 0.0 and bounds[r // 2 + 2] == 0.0  # chance, and a little above it
    assert bounds[r] > 2.0


def test_delta_and_confidence_only_weaken_the_bound():
    base = epsilon_lower_bound(1000, 100, 90, 0.0)
    assert epsilon_lower_bound(1000, 100, 90, 1e-3) < base
    assert epsilon_lower_bound(1000, 100, 90, 0.0, confidence=0.99) < base
    # the delta term sums over the m canaries, not the r guesses: more abstentions cost more
    assert epsilon_lower_bound(100000, 100, 90, 1e-4) < epsilon_lower_bound(1000, 100, 90, 1e-4)


def test_p_value_at_epsilon_zero_is_a_fair_coin_tail():
    from scipy.stats import binom

    assert p_value(100, 40, 30, 0.0, 0.0) == pytest.approx(binom.sf(29, 40, 0.5))
    assert p_value(100, 40, 0, 3.0, 1e-5) == 1.0
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------- parts


def test_canaries_are_public_distinct_and_randomly_labelled():
    a, b = make_canaries(300, 4, seed=7), make_canaries(300, 4, seed=7)
    assert a == b and len({c.text for c in a}) == 300
    assert {c.label for c in a} == {0, 1, 2, 3}
    assert make_canaries(300, 4, seed=8) != a


def test_guesses_take_the_extremes_and_abstain_in_between():
    t = guess(np.array([0.1, 5.0, -3.0, 2.0, 0.0]), k_in=2, k_out=1)
    assert t.tolist() == [0, 1, -1, 1, 0]


def test_black_box_score_removes_the_models_label_prior():
    """Every text predicted as label 0: label-0 canaries must not all look like members."""
    lp = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.9, 0.1]]))
    scores = black_box_scores(lp, np.array([0, 1, 0, 1]))
    assert scores[2] < 0 < scores[0]  # a label-0 canary the model is *less* sure of scores lower


def test_config_validates_the_audit_table():
    raw = {"empirical_audit": {"enabled": True, "adversary": "white-box"}}
    with pytest.raises(ConfigError, match=r"white-box.*not implemented"):
        from_dict(raw)
    with pytest.raises(ConfigError, match=r"empirical_audit\.client"):
        from_dict({"empirical_audit": {"client": "nobody"}})
    with pytest.raises(ConfigError, match=r"empirical_audit\.guesses"):
        from_dict({"empirical_audit": {"canaries": 10, "guesses": 11}})


def test_no_noise_fault_removes_the_noise_but_not_its_record(tiny_texts, tokenizer, monkeypatch):
    """With FEDLLM_FAULT_NO_NOISE the trained model no longer depends on the noise multiplier (there is no
    noise), yet the accountant still records each multiplier as planned: the ledger cannot tell."""
    import torch

    from fedllm.accounting import make_accountant
    from fedllm.config import ModelConfig
    from fedllm.model import build_model, get_trainable
    from fedllm.training import DPSettings, TokenizedDataset, train_dp

    data = TokenizedDataset(tiny_texts, tokenizer, 32)

    def run(sigma: float) -> tuple[list[np.ndarray], list]:
        model = build_model(ModelConfig(name="tiny-bert", mode="lora"), 2)
        accountant = make_accountant("prv")
        torch.manual_seed(0)  # same Poisson batches (and, without the fault, the same noise draws)
        dp = DPSettings(noise_multiplier=sigma, max_grad_norm=1.0, mode="lora")
        train_dp(model, data, steps=3, batch_size=16, learning_rate=1e-2, dp=dp, accountant=accountant,
                 device=torch.device("cpu"))  # fmt: skip
        return get_trainable(model), accountant.history

    honest_small, _ = run(0.5)
    honest_large, _ = run(50.0)
    assert any(not np.allclose(a, b) for a, b in zip(honest_small, honest_large, strict=True))
    monkeypatch.setenv("FEDLLM_FAULT_NO_NOISE", "1")
    monkeypatch.setenv("FEDLLM_TESTING", "1")  # switches work only in a test simulation
    monkeypatch.setenv("FEDLLM_IN_SIMULATION", "1")
    broken_small, history_small = run(0.5)
    broken_large, history_large = run(50.0)
    assert all(np.allclose(a, b) for a, b in zip(broken_small, broken_large, strict=True))
    assert [h[0] for h in history_small] == [0.5] and [h[0] for h in history_large] == [50.0]


def test_prepare_hands_the_audited_client_only_its_included_canaries_as_plain_rows(tmp_path):
    """The coins stay with the auditor: the client's folder gets the included canaries as ordinary rows (text and
    label name, nothing else), the client appends them like any data file, and a resumed run keeps its coins."""
    cfg = from_dict(tomllib.loads(EMPIRICAL_SCENARIO))
    spec = RunSpec(config=cfg, out_dir=tmp_path / "run")
    prepare(spec)
    secret_path = RunDir(spec.out_dir).empirical_secret_path
    secret = json.loads(secret_path.read_text())
    included = [c for c in secret["canaries"] if c["included"]]
    assert len(secret["canaries"]) == 200 and 0 < len(included) < 200
    extra = ClientDir(spec.client_dir("client-0")).extra_rows_path
    assert secret_path.stat().st_mode & 0o777 == 0o600 and extra.stat().st_mode & 0o777 == 0o600
    rows = [json.loads(line) for line in extra.read_text().splitlines()]
    assert all(set(r) == {"text", "label"} for r in rows)  # no coin, no excluded canary, no mark of an audit
    assert [r["text"] for r in rows] == [c["text"] for c in included]
    labels = federation_data(cfg).label_names
    assert [labels.index(r["label"]) for r in rows] == [c["label"] for c in included]

    before = secret_path.read_bytes()
    prepare(spec)  # resumed: same canaries, same coins
    assert secret_path.read_bytes() == before

    split = federation_data(cfg).clients[0]
    grown = with_extra_rows(split, extra, labels)
    n = len(split.train)
    assert grown.train.texts[:n] == split.train.texts and grown.train.labels[:n] == split.train.labels
    assert grown.train.texts[n:] == tuple(c["text"] for c in included)
    assert grown.train.labels[n:] == tuple(c["label"] for c in included)
    assert grown.test == split.test


def test_the_client_never_imports_the_audit():
    """Canaries reach a client as extra rows only: the client's code has no way to tell it is audited."""
    code = "import sys, fedllm.client; print(sorted(m for m in sys.modules if m.startswith('fedllm.audit')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
