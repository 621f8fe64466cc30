"""The config schema: a client's effective settings are worked out in one place, and config stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedllm.config import ClientConfig, FederationConfig, PrivacyConfig, TrainingConfig, from_dict
from fedllm.errors import ConfigError


def _federation() -> FederationConfig:
    return FederationConfig(
        rounds=5,
        num_clients=2,
        privacy=PrivacyConfig(epsilon=8.0, delta=1e-5, noise_multiplier=None, planned_rounds=None, accountant="rdp"),
        training=TrainingConfig(local_steps=20, batch_size=32),
        clients=(
            ClientConfig(
                id="own",
                epsilon=2.0,
                delta=1e-6,
                noise_multiplier=1.5,
                planned_rounds=3,
                local_steps=7,
                batch_size=9,
                declared_examples=400,
            ),
            ClientConfig(id="defaults"),
        ),
    )


def test_client_entries_win_over_the_federation_defaults() -> None:
    s = _federation().client_settings("own")
    assert (s.epsilon, s.delta, s.noise_multiplier, s.planned_rounds) == (2.0, 1e-6, 1.5, 3)
    assert (s.local_steps, s.batch_size, s.declared_examples) == (7, 9, 400)
    assert s.accountant == "rdp", "the accountant is federation-wide"


def test_unset_client_entries_fall_back_to_privacy_training_and_rounds() -> None:
    s = _federation().client_settings("defaults")
    assert (s.epsilon, s.delta, s.noise_multiplier) == (8.0, 1e-5, None)
    assert s.planned_rounds == 5, "no planned_rounds anywhere: the run's rounds"
    assert (s.local_steps, s.batch_size, s.declared_examples) == (20, 32, None)


def test_privacy_planned_rounds_is_the_default_for_clients_without_their_own() -> None:
    cfg = from_dict({"rounds": 6, "privacy": {"planned_rounds": 4}, "clients": [{"id": "a", "planned_rounds": 2}]})
    cfg_b = from_dict({"rounds": 6, "num_clients": 2, "privacy": {"planned_rounds": 4}, "clients": [{"id": "a"}]})
    assert cfg.client_settings("a").planned_rounds == 2
    assert [cfg_b.client_settings(c).planned_rounds for c in cfg_b.client_ids] == [4, 4]


def test_unknown_client_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="clients: no client with id 'nobody'"):
        _federation().client_settings("nobody")


def test_config_imports_no_data_module_and_no_numpy() -> None:
    """Data reads its settings from config, never the reverse; and every light command imports config."""
    code = (
        "import sys, fedllm.config, fedllm.config.schema, fedllm.config.load, fedllm.config.validation\n"
        "print(sorted(m for m in sys.modules if m.startswith('fedllm.data') or m in ('numpy', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
