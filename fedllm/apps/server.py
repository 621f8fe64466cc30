"""The Flower ServerApp (``fedllm.apps.server:app``), for ``flwr run .`` and ``fedllm run``.

The run's config comes from Flower's ``run_config``. ``flwr run .`` simulates as many SuperNodes as the
federation config says (Flower's default is 2), whatever the scenario: a scenario of 3 clients would wait
for a third node forever, and one of 1 client would index past its client list. The simulated node count is
fixed before this app starts, so the app cannot size it; it checks it and stops at once with the flag to pass.
"""

from __future__ import annotations

import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedllm.config import FederationConfig
from fedllm.coordinator import run_federation
from fedllm.errors import ConfigError
from fedllm.runspec import spec_from_run_config

NODES_WAIT_S = 10.0  # Flower's simulation registers its nodes just after this app's thread starts


def check_simulated_nodes(grid: Grid, cfg: FederationConfig, wait_s: float = NODES_WAIT_S) -> None:
    """Raise with the ``--federation-config`` to pass unless the simulated federation has one node per client.

    Only a simulated federation (Flower's in-memory grid) is checked: deployed nodes join when they start,
    and there the strategy's own minimum of clients decides when a round begins.
    """
    if not isinstance(grid, InMemoryGrid):
        return
    deadline = time.monotonic() + wait_s
    nodes = len(list(grid.get_node_ids()))
    while nodes < cfg.num_clients and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = len(list(grid.get_node_ids()))
    if nodes != cfg.num_clients:
        raise ConfigError(
            f"scenario '{cfg.name}' has {cfg.num_clients} clients but this simulated federation has {nodes} "
            f'SuperNodes: run `flwr run . --federation-config "num-supernodes={cfg.num_clients}"`'
        )


def main(grid: Grid, context: Context) -> None:
    spec = spec_from_run_config(context.run_config)
    check_simulated_nodes(grid, spec.config)
    run_federation(grid, context, spec)


app = ServerApp()
app.main()(main)
