"""Many clients on one machine, or on a Ray cluster: Flower's simulation engine (Ray backend), in this process.

In-process ``run_simulation`` starts no detached SuperLink (``flwr run`` does, and it outlives the
command), so nothing is left running when it returns. Two ways to get Ray:

* no ``[simulation] ray_address``: a private Ray instance on this machine (no dashboard), stopped at the end;
* ``ray_address``: this process joins that running cluster as one more driver. Flower skips ``ray.init``
  when Ray is already initialised (``RayBackend.init_ray``), and ``ray.shutdown`` at the end only
  disconnects this driver: a cluster fedllm did not start, it never stops.

GPU placement is explicit: a client sees a GPU only when ``num_gpus`` > 0 reserves one, in quiet and verbose
mode alike (Ray hides every GPU from a worker that reserved none: ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterable

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedllm import faults
from fedllm.config import FederationConfig, SimulationConfig
from fedllm.errors import ConfigError


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


# Ray hides the GPUs from a worker that reserved none only while this is true (its default today, announced
# to change): set, not defaulted, so num_gpus = 0 means "no GPU" whatever the environment or Ray version.
GPU_ISOLATION = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
# What a worker on a cluster we join must see of this process' environment (a local instance inherits it
# all): fault switches and the simulation marker, data and cache locations, offline mode, log settings.
FORWARDED_PREFIXES = ("FEDLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "PYTHONWARNINGS", "FLWR_TELEMETRY")


def check_placement(cfg: FederationConfig) -> None:
    """A client trains on a GPU only when its resources reserve one; say so before Ray starts."""
    device = cfg.training.device
    if device.startswith("cuda") and cfg.simulation.num_gpus <= 0:
        raise ConfigError(
            f"training.device: {device} needs a GPU reserved per client: set [simulation] num_gpus > 0"
            " (--num-gpus, e.g. 0.5 for two clients per GPU); with num_gpus = 0 clients see no GPU"
        )


def _ray_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*sys.path, os.environ.get("PYTHONPATH", "")) if p)
    return {**env, **GPU_ISOLATION}


def join_cluster(address: str, verbose: bool) -> str:
    """Connect this process to a running Ray cluster (never starts one: a wrong address is an error).

    Workers there were started by the cluster, not by us, so the environment they need travels in the
    job's runtime_env; Flower then finds Ray initialised and uses it as it is.
    """
    import ray

    _check_reachable(address)
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": _ray_environment()},
            logging_level="info" if verbose else "error",
            log_to_driver=verbose,
        )
    except ConnectionError as exc:
        raise ConfigError(f"simulation.ray_address: no Ray cluster at {address} ({exc})") from None
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return (
        f"joined Ray cluster {address} (job {ray.get_runtime_context().get_job_id()}): {len(nodes)} node(s),"
        f" {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    )


def _check_reachable(address: str) -> None:
    """Fail in a second, not after Ray's minute of retries, when nothing listens at ``host:port``."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: ray.init resolves and reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"simulation.ray_address: no Ray cluster at {address} ({exc})") from None


# Ray pre-starts one idle Python worker per CPU for the first driver; Flower's client actors carry this job's
# runtime_env, so they never reuse those: two processes that only cost start-up CPU and memory here.
NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def backend_config(sim: SimulationConfig, verbose: bool) -> dict:
    """Flower's Ray backend settings. ``init_args`` apply only to the private instance (Flower skips
    ``ray.init`` on a cluster we joined); ``address="local"`` makes sure that instance is ours, even where
    ``RAY_ADDRESS`` names a cluster. No dashboard and no idle pre-started workers: the run uses neither."""
    return {
        "client_resources": {"num_cpus": sim.num_cpus, "num_gpus": sim.num_gpus},
        "init_args": {
            "address": "local",
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "info" if verbose else "error",
            "log_to_driver": verbose,
            "_system_config": NO_PRESTART,
        },
    }


def prepare_environment(verbose: bool) -> None:
    """This process' environment, which a private Ray instance's workers inherit (a joined cluster's get
    :func:`_ray_environment`): the same GPU isolation in quiet and verbose mode."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline: never phone home
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    faults.refuse_if_set("simulation")  # a fault switch needs a test's marker, before anything starts
    os.environ[faults.IN_SIMULATION] = "1"  # inherited by the Ray workers: switches work only in here
    os.environ.update(GPU_ISOLATION)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")  # the default we now pin
    quiet_logs(verbose)


def _sweep_waiting_nodes(state, queue, nodes_mapping, f_stop) -> None:  # type: ignore[no-untyped-def]
    """Flower 1.42's ``vce_api.add_messages_to_queue``, asking only nodes that have a message waiting.

    Flower's loop asks the link state for every registered node's next message ten times a second, and each
    ask scans every stored message: at 10,000 nodes a sweep keeps a core busy while a round's messages are
    out (the CPU its clients train on) and delays each message by up to a sweep. Same messages, at most one
    per node per sweep as before, same expiry checks; O(stored messages) a sweep, not O(nodes x messages).
    """
    store = getattr(state, "message_ins_store", None)
    if store is None or not hasattr(state, "_check_stored_messages"):
        return _FLOWER_SWEEP[0](state, queue, nodes_mapping, f_stop)  # another link state: Flower's own loop
    while not f_stop.is_set():
        with state.lock:
            state._check_stored_messages(set(store))
            waiting = dict.fromkeys(m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == "")
        for node_id in waiting:
            if node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        f_stop.wait(0.1)


_FLOWER_SWEEP: list = []


def sweep_only_waiting_nodes() -> None:
    """Swap in :func:`_sweep_waiting_nodes` (idempotent); cost per round then follows the sampled clients."""
    from flwr.server.superlink.fleet.vce import vce_api

    if not _FLOWER_SWEEP:
        _FLOWER_SWEEP.append(vce_api.add_messages_to_queue)
        vce_api.add_messages_to_queue = _sweep_waiting_nodes


class _RegisteredNodes:
    """``InMemoryGrid.get_node_ids`` for Flower's simulation engine, listed once the federation is complete.

    Flower's legacy workflow re-lists the registered nodes before every ``sample``/``num_available``/``all``
    and every 5 s (``flwr.server.compat.app_utils``), and each listing walks all nodes to tag offline ones:
    about 11 ms at 10,000 nodes (at load 8; 85 ms under cProfile), several times a round. The engine registers
    its nodes once, with heartbeats off (online until 1e300 s), and never removes one, so once all
    ``expected`` nodes are listed the list cannot change; until then every call asks the grid, as before.
    """

    def __init__(self, ask: Callable[[], Iterable[int]], expected: int):
        self.ask, self.expected = ask, expected
        self.nodes: tuple[int, ...] | None = None

    def __call__(self) -> Iterable[int]:
        if self.nodes is not None:
            return self.nodes
        nodes = tuple(self.ask())
        if len(nodes) >= self.expected:
            self.nodes = nodes
        return nodes


def list_nodes_once(grid: object, expected: int) -> None:
    """Cache a simulated federation's node list on ``grid`` (see :class:`_RegisteredNodes`); any other grid
    (deployment's, whose nodes come and go) is left alone."""
    from flwr.superlink.grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid) and not isinstance(grid.get_node_ids, _RegisteredNodes):
        grid.get_node_ids = _RegisteredNodes(grid.get_node_ids, expected)  # type: ignore[method-assign]


def run_engine(cfg: FederationConfig, server_app: ServerApp, client_app: ClientApp, verbose: bool = False) -> None:
    """One ServerApp and ``cfg.num_clients`` SuperNodes in Flower's simulation engine; Ray is released after."""
    prepare_environment(verbose)
    from flwr.simulation import run_simulation

    check_placement(cfg)
    sweep_only_waiting_nodes()
    try:
        if cfg.simulation.ray_address:
            print(f"fedllm: {join_cluster(cfg.simulation.ray_address, verbose)}", file=sys.stderr)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(cfg.simulation, verbose),
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # our private instance stops; on a joined cluster only this driver disconnects
