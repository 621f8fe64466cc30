"""Property tests: whatever a scenario file holds, loading it yields a valid config or a ConfigError."""

from __future__ import annotations

import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.config import FederationConfig, from_dict, to_toml
from fedllm.errors import ConfigError

TINY = tomllib.loads((Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml").read_text())
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 50),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)
KEYS = [
    ("rounds",),
    ("num_clients",),
    ("clients_per_round",),
    ("min_clients",),
    ("seed",),
    ("privacy", "epsilon"),
    ("privacy", "delta"),
    ("privacy", "accountant"),
    ("privacy", "max_grad_norm"),
    ("model", "mode"),
    ("model", "max_length"),
    ("training", "local_steps"),
    ("training", "batch_size"),
    ("training", "learning_rate"),
    ("training", "device"),
    ("data", "partition"),
    ("data", "alpha"),
    ("data", "test_fraction"),
    ("unknown",),
    ("privacy", "unknown"),
]


def _mutated(edits: list[tuple[tuple[str, ...], object]]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for path, value in edits:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), scalars), max_size=4))
def test_any_scenario_loads_or_fails_with_a_config_error(edits):
    raw = _mutated(edits)
    try:
        cfg = from_dict(raw, source="s.toml")
    except ConfigError as exc:
        assert str(exc).startswith("s.toml: "), exc
        return
    assert isinstance(cfg, FederationConfig)
    assert cfg.rounds >= 1 and cfg.privacy.epsilon > 0 and 0 < cfg.privacy.delta < 1
    # a valid config survives its own round trip through config.toml
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
