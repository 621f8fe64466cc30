"""Many clients on one machine: Flower's simulation engine (Ray backend), in this process.

In-process ``run_simulation`` starts no detached SuperLink (``flwr run`` does, and it outlives the
command), so nothing is left running when it returns; Ray is shut down explicitly all the same.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from functools import partial

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedllm import metrics as run_metrics
from fedllm.coordinator import main_for
from fedllm.metrics import RoundRecord, RunMetrics
from fedllm.runspec import RunSpec
from fedllm.secure_aggregation import secagg_mod


def _client_fn(spec: RunSpec, context: Context):
    from fedllm.client import client_for

    return client_for(spec, context).to_client()


def quiet_logs(verbose: bool) -> None:
    """Flower and Ray log every message at INFO; a researcher wants the progress bar and the table.

    Our own warnings (refusals, dropouts) stay visible; third-party deprecation chatter does not.
    """
    if verbose:
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(
    spec: RunSpec, *, on_round: Callable[[RoundRecord], None] | None = None, verbose: bool = False
) -> RunMetrics:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline: never phone home
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_logs(verbose)
    from flwr.simulation import run_simulation

    from fedllm import empirical

    cfg = spec.config
    empirical.prepare(spec)  # an [empirical_audit] run: canaries and secret coins before any client starts
    server_app = ServerApp()
    server_app.main()(main_for(spec, on_round))
    required = cfg.secure_aggregation.enabled
    client_app = ClientApp(client_fn=partial(_client_fn, spec), mods=[secagg_mod(lambda _: required)])
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "info" if verbose else "error",
            "log_to_driver": verbose,
        },
    }
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    empirical.finish(spec)  # the adversary's guesses on the final model, and the lower bound
    return run_metrics.read(spec.out_dir / "metrics.json")
