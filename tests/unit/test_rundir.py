"""A run directory's paths and typed readers: each file read by its own format's owner."""

from __future__ import annotations

import pytest

from fedllm.config import load_config
from fedllm.errors import ConfigError
from fedllm.metrics import RunMetrics, write
from fedllm.run.rundir import RunDir
from fedllm.run.spec import RunSpec


def test_the_config_written_is_the_config_read(tmp_path) -> None:
    cfg, _ = load_config("tiny", {"rounds": 3})
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)  # creates the directory
    assert run.read_config() == cfg
    assert run.read_config_data()["rounds"] == 3
    assert len(run.config_sha256()) == 64


def test_a_broken_config_names_its_file(tmp_path) -> None:
    run = RunDir(tmp_path)
    run.config_path.write_text("rounds = [")
    with pytest.raises(ConfigError, match=str(run.config_path)):
        run.read_config()


def test_paths_and_clients_on_disk(tmp_path) -> None:
    run = RunDir(tmp_path)
    assert not run.has_run()
    write(RunMetrics(run_id="r", scenario="s", dp=True, rounds_planned=1), run.metrics_path)
    assert run.has_run() and run.read_metrics().run_id == "r"
    for cid in ("b", "a"):
        run.client(cid).root.mkdir(parents=True)
        run.client(cid).ledger_path.touch()
    (run.clients_root / "no-ledger").mkdir()
    assert run.client_ids_on_disk() == ["a", "b"]
    assert run.client("a").ledger_path.parent == run.clients_root / "a"


def test_a_spec_finds_its_records_through_the_run_directory(tmp_path) -> None:
    cfg, _ = load_config("tiny")
    spec = RunSpec(config=cfg, out_dir=tmp_path)
    assert spec.ledger_path == RunDir(tmp_path).ledger_path
    assert spec.client_dir("client-0") == RunDir(tmp_path).client("client-0").root
