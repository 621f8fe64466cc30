"""The one-run empirical audit (fedllm/empirical.py): the bound itself, and three runs that must come out right.

The bound is checked against numbers: values printed in Steinke, Nasr, Jagielski (arXiv:2305.08846v1,
Appendix D and Section 7), the closed form when delta = 0, monotonicity, and chance-level guessing.
The runs use tiny-bert in full fine-tuning on 2 clients x 1 round, 200 canaries, 40 guesses: a setting
that memorises, so the attack has something to find when the noise is missing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedllm.cli import main
from fedllm.config import from_dict
from fedllm.empirical import (
    AUDIT_DIR,
    CLIENT_FILE,
    EMPIRICAL_VIOLATION,
    RESULT_FILE,
    SECRET_FILE,
    black_box_scores,
    epsilon_lower_bound,
    guess,
    load_result,
    make_canaries,
    p_value,
)
from fedllm.errors import ConfigError

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


# ---------------------------------------------------------------------------------------------- runs


SCENARIO = """
name = "empirical-tiny"
rounds = 1
num_clients = 1
seed = 0

[model]
name = "tiny-bert"
mode = "full"
max_length = 32

[data]
source = "synthetic"
partition = "iid"
max_examples = 200
test_fraction = 0.1
max_central_test = 50

[training]
local_steps = 200
batch_size = 16
learning_rate = 5e-3

[privacy]
epsilon = 0.25  # small: a noise-free run clears it by a wide margin (29 of 40 right suffice; seen 34-40)
delta = 1e-5

[secure_aggregation]
enabled = false  # one client: the final model is its own, undiluted by averaging (run to run stable)

[empirical_audit]
enabled = true
canaries = 200
guesses = 40
"""


def _simulate(tmp_path: Path, *flags: str) -> Path:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "run"
    assert main(["simulate", str(scenario), "--quiet", "--out", str(out), *flags]) == 0
    return out


@pytest.mark.slow
def test_without_dp_the_canaries_are_found(tmp_path):
    """DP off, a memorising setting: the bound is clearly above zero. Also the ``audit --empirical`` path:
    the run's config.toml is re-run with canaries into DIR/empirical/rerun (a re-run needs only the config)."""
    from fedllm.config import to_toml
    from fedllm.ledger import Ledger

    raw = tomllib.loads(SCENARIO)
    raw["privacy"]["enabled"] = False
    raw["empirical_audit"]["enabled"] = False  # the original run had no canaries
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(from_dict(raw)))
    Ledger(run / "ledger.sqlite").close()
    assert main(["audit", str(run), "--empirical"]) == 0
    result = load_result(run)
    assert result is not None and result.reference_run == str(run)
    assert (run / AUDIT_DIR / "rerun" / AUDIT_DIR / SECRET_FILE).is_file()
    assert not result.dp and result.theoretical_epsilon is None and not result.violation
    assert result.canaries == 200 and result.guesses == 40
    assert result.lower_bound > 0.5, result.describe()


@pytest.mark.slow
def test_with_dp_the_bound_stays_below_the_reported_epsilon(tmp_path, capsys):
    out = _simulate(tmp_path)
    result = load_result(out)
    assert result is not None and result.dp and result.theoretical_epsilon is not None
    assert 0 < result.theoretical_epsilon <= 0.25
    assert result.lower_bound <= result.theoretical_epsilon, result.describe()
    assert main(["audit", str(out)]) == 0
    assert "empirical audit" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    (row,) = report["empirical_audit"]
    assert row["client"] == "client-0" and row["violation"] is False
    assert row["theoretical_epsilon"] == pytest.approx(result.theoretical_epsilon)
    assert row["lower_bound"] == pytest.approx(result.lower_bound)


@pytest.mark.slow
def test_missing_noise_is_caught_although_the_ledger_looks_right(tmp_path, capsys):
    """FEDLLM_FAULT_NO_NOISE: DP-SGD adds no noise while the accountant records the planned noise. The
    ledger audit cannot see it; the empirical bound rises above the reported epsilon and fails the audit."""
    # In a process of its own: Flower reuses a Ray instance already up in this one, whose workers would not
    # see the variable; a fresh process starts a fresh Ray whose workers inherit it.
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedllm.cli", "simulate", str(scenario), "--quiet", "--out", str(out)]
    done = subprocess.run(
        cmd, env={**os.environ, "FEDLLM_FAULT_NO_NOISE": "1", "FEDLLM_TESTING": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = load_result(out)
    assert result is not None and result.theoretical_epsilon is not None
    assert result.theoretical_epsilon <= 0.25  # the accountant still reports the planned spend
    assert result.violation and result.lower_bound > result.theoretical_epsilon, result.describe()

    capsys.readouterr()
    assert main(["audit", str(out)]) == 1
    printed = capsys.readouterr().out
    assert EMPIRICAL_VIOLATION in printed and "client-0" in printed
    assert main(["audit", str(out), "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert findings and all(f.startswith(EMPIRICAL_VIOLATION) for f in findings)  # the ledger itself is clean

    report = json.loads((out / "report.json").read_text())
    assert report["empirical_audit"][0]["violation"] is True
    assert "empirical-table" in (out / "report.html").read_text()

    # the coins stay with the auditor: not in what the coordinator wrote, and private on disk
    secret = out / AUDIT_DIR / SECRET_FILE
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (out / AUDIT_DIR / RESULT_FILE).stat().st_mode & 0o777 == 0o600
    assert "included" not in (out / "config.toml").read_text()
    assert (out / "clients" / "client-0" / CLIENT_FILE).is_file()
