"""The packaged pretrained MiniLM learns a real task under DP: accuracy rises well above chance."""

from __future__ import annotations

import pytest

from fedllm import metrics as run_metrics
from fedllm.cli import main
from fedllm.paths import shared_data_dir

INTENTS = ["age_limit", "apple_pay_or_google_pay", "terminate_account", "change_pin"]


@pytest.mark.skipif(
    not (shared_data_dir() / "banking77" / "train.csv").is_file(),
    reason=f"Banking77 not found under {shared_data_dir()} (set FEDLLM_SHARED to the shared folder)",
)
def test_minilm_dp_fedavg_on_a_separable_banking77_subset(tmp_path):
    scenario = tmp_path / "banks4.toml"
    scenario.write_text(
        f"""
name = "banks4"
rounds = 3
num_clients = 3

[model]
name = "minilm"
mode = "lora"
max_length = 32

[data]
source = "banking77"
keep_labels = {INTENTS!r}
partition = "iid"
test_fraction = 0.1
max_central_test = 160

[training]
local_steps = 12
batch_size = 16
learning_rate = 1e-2

[privacy]
epsilon = 8.0
delta = 1e-5
""".replace("'", '"')
    )
    out = tmp_path / "run"
    assert main(["simulate", str(scenario), "--quiet", "--out", str(out)]) == 0
    m = run_metrics.read(out / "metrics.json")
    chance = 1 / len(INTENTS)
    assert m.initial_accuracy is not None and m.initial_accuracy < 0.5
    assert m.rounds[-1].accuracy is not None and m.rounds[-1].accuracy > 2 * chance
    assert all(c.epsilon is not None and c.epsilon <= 8.0 for c in m.rounds[-1].clients.values())
