"""The run spec the simulation ships to its workers: rebuilt once per process, and the config's cached hash
never travels (a str's hash differs between processes)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from fedllm.config import ClientConfig, FederationConfig, config_hash
from fedllm.run.spec import RunSpec, ShippedSpec


def _config(n: int = 50) -> FederationConfig:
    return FederationConfig(num_clients=n, clients=tuple(ClientConfig(id=f"client-{i}") for i in range(n)))


def test_config_hash_is_the_dataclass_hash_of_its_fields_and_equality_is_unchanged() -> None:
    cfg = _config()
    assert hash(cfg) == hash(tuple(getattr(cfg, f.name) for f in fields(cfg)))
    assert hash(cfg) == hash(cfg)  # cached: the same value again
    twin = _config()
    assert twin == cfg and twin is not cfg and hash(twin) == hash(cfg)
    other = FederationConfig(num_clients=50, clients=(*cfg.clients[:-1], ClientConfig(id="client-49", epsilon=1.0)))
    assert other != cfg
    assert {cfg: 1}[twin] == 1  # usable as a cache key across equal objects


def test_a_pickled_config_carries_no_cached_hash_nor_index() -> None:
    cfg = _config()
    hash(cfg)
    cfg.client("client-3")  # builds the id index
    state = cfg.__getstate__()
    assert "_hash" not in state and "_clients_by_id" not in state
    copy = pickle.loads(pickle.dumps(cfg))
    assert copy == cfg and "_hash" not in copy.__dict__
    assert hash(copy) == hash(cfg) and copy.client("client-3") == cfg.client("client-3")
    assert config_hash(copy) == config_hash(cfg)


def test_a_config_pickled_in_another_process_hashes_as_this_one_computes_it(tmp_path: Path) -> None:
    """Hash randomisation: a hash cached in one process and unpickled in another would mismatch equal keys."""
    cfg = _config()
    hash(cfg)
    blob = tmp_path / "cfg.pickle"
    out = tmp_path / "back.pickle"
    code = (
        "import pickle, sys; from pathlib import Path; cfg = pickle.loads(Path(sys.argv[1]).read_bytes());"
        " hash(cfg); Path(sys.argv[2]).write_bytes(pickle.dumps(cfg))"
    )
    blob.write_bytes(pickle.dumps(cfg))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(blob), str(out)], check=True, env=env)
    back = pickle.loads(out.read_bytes())
    assert back == cfg and hash(back) == hash(cfg) and {cfg: 1}[back] == 1


def test_a_shipped_spec_is_rebuilt_once_per_process_without_ray(tmp_path: Path) -> None:
    spec = RunSpec(config=_config(), out_dir=tmp_path)
    shipped = ShippedSpec(spec)
    first = pickle.loads(pickle.dumps(shipped))
    second = pickle.loads(pickle.dumps(shipped))
    assert first.spec == spec
    assert second.spec is first.spec  # found again by digest, not unpickled again
    assert pickle.loads(pickle.dumps(first)).spec is first.spec
