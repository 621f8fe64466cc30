"""Where simulated clients run: a GPU only when their resources reserve one, in every logging mode.

The GPU itself is checked by ``python -m benchmarks.gpu --quick`` on a machine that has one; these tests
pin the settings that decide it, which a CPU machine can check.
"""

from __future__ import annotations

import os

import pytest

from fedllm.cli import build_parser
from fedllm.cli.simulate import overrides_from
from fedllm.config import load_config
from fedllm.errors import ConfigError
from fedllm.metrics import ClientRound, RoundRecord, RunMetrics
from fedllm.simulation import GPU_ISOLATION, _ray_environment, backend_config, check_placement, prepare_environment


def _cfg(*flags: str):
    return load_config("tiny", overrides_from(build_parser().parse_args(["simulate", "tiny", *flags])))[0]


def test_resource_flags_reach_the_client_resources():
    cfg = _cfg("--num-gpus", "0.5", "--num-cpus", "2", "--ray-address", "10.0.0.1:6379")
    assert cfg.simulation.num_gpus == 0.5 and cfg.simulation.num_cpus == 2.0
    assert cfg.simulation.ray_address == "10.0.0.1:6379"
    assert backend_config(cfg.simulation, verbose=False)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}


def test_default_is_no_gpu_and_a_private_ray_instance():
    cfg = _cfg()
    assert cfg.simulation.num_gpus == 0.0 and cfg.simulation.ray_address is None
    init = backend_config(cfg.simulation, verbose=True)["init_args"]
    assert init["address"] == "local"  # never an existing cluster by accident (RAY_ADDRESS)
    assert init["include_dashboard"] is False
    assert init["_system_config"]["prestart_worker_first_driver"] is False  # no idle workers the run never uses


@pytest.mark.parametrize("flags", [(), ("--num-gpus", "0")])
def test_a_cuda_device_without_a_reserved_gpu_is_refused(flags):
    with pytest.raises(ConfigError, match="num_gpus > 0"):
        check_placement(_cfg("--device", "cuda", *flags))
    check_placement(_cfg("--device", "cuda", "--num-gpus", "1"))
    check_placement(_cfg())  # auto: a GPU where one is reserved, else the CPU


@pytest.mark.parametrize("flags", [("--num-gpus", "-1"), ("--ray-address", " ")])
def test_bad_resource_settings_are_config_errors(flags):
    with pytest.raises(ConfigError):
        _cfg(*flags)


@pytest.mark.parametrize("verbose", [False, True])
def test_gpu_isolation_is_the_same_in_quiet_and_verbose_mode(verbose, monkeypatch):
    """The old code let num_gpus = 0 clients see every GPU in quiet mode only; now never, in both modes,
    whatever the caller's environment says, for a private instance (inherited) and a joined cluster."""
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    monkeypatch.setenv("FEDLLM_FAULT_X", "1")
    for key in ("FEDLLM_IN_SIMULATION", "PYTHONWARNINGS"):
        monkeypatch.delenv(key, raising=False)  # prepare_environment sets them; monkeypatch restores them
    prepare_environment(verbose)
    assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"
    env = _ray_environment()  # what workers on a joined cluster get
    assert env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == GPU_ISOLATION["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"
    assert env["FEDLLM_FAULT_X"] == "1" and env["FEDLLM_IN_SIMULATION"] == "1"
    assert "PYTHONPATH" in env


def test_the_run_records_each_clients_device():
    rounds = [
        RoundRecord(
            1, clients={"a": ClientRound("trained", device="cuda:0"), "b": ClientRound("trained", device="cpu")}
        ),
        RoundRecord(2, clients={"a": ClientRound("dropped"), "b": ClientRound("trained", device="cpu")}),
    ]
    metrics = RunMetrics(run_id="r", scenario="s", dp=True, rounds_planned=2, rounds=rounds)
    assert metrics.devices() == {"a": ["cuda:0"], "b": ["cpu"]}
    assert metrics.final_clients()["a"].device == "cuda:0"  # a dropped round keeps the last device known
