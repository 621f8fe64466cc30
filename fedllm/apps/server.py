"""The coordinator's side: one ServerApp factory, used by ``fedllm simulate``, ``flwr run .`` and ``fedllm run``.

The app holds the initial model, evaluates centrally, and runs FedAvg on Flower's legacy workflow, so that
a secure-aggregation fit workflow replaces the plain one without touching the strategy. Records are the
:class:`~fedllm.run.recorder.Recorder`'s; what a run directory holds before the first round is the
lifecycle's (:mod:`fedllm.run.lifecycle`).

``flwr run .`` simulates as many SuperNodes as the federation config says (Flower's default is 2), whatever
the scenario: a scenario of 3 clients would wait for a third node forever, and one of 1 client would index
past its client list. The node count is fixed before this app starts, so the app cannot size it; it checks
it and stops at once with the flag to pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid
from torch import nn
from torch.utils.data import Dataset

from fedllm.config import FederationConfig, config_hash
from fedllm.data.federation import federation_data
from fedllm.data.records import FederatedData
from fedllm.errors import ConfigError
from fedllm.features import node_dataset
from fedllm.head_prior import init_head
from fedllm.ledger import Ledger
from fedllm.metrics import RoundRecord, RunMetrics
from fedllm.model import build_model, get_trainable, pick_device, set_trainable
from fedllm.run.recorder import ModelRecord, Recorder
from fedllm.run.rundir import RunDir
from fedllm.run.spec import RunSpec, spec_from_run_config
from fedllm.secure_aggregation import Masking, fit_workflow
from fedllm.simulation import list_nodes_once
from fedllm.strategy import BudgetAwareFedAvg, Selection
from fedllm.training import evaluate

NODES_WAIT_S = 10.0  # Flower's simulation registers its nodes just after this app's thread starts
# max_weight where the coordinator holds no client's data (deployment): on the 2**30-step grid a client of
# 100 examples still lands within 1e-3 of its delta's values; larger clients are capped (and warned).
DEPLOYED_MAX_WEIGHT = 100_000


def _central_evaluator(spec: RunSpec, model, test: Dataset) -> Callable[[list[np.ndarray]], tuple]:
    device = pick_device(spec.config.training.device)

    def run(arrays: list[np.ndarray]) -> tuple[float, float]:
        set_trainable(model, arrays)
        return evaluate(model, test, batch_size=spec.config.training.eval_batch_size, device=device)

    return run


def _masking(cfg: FederationConfig, fed: FederatedData) -> Masking | None:
    """SecAgg+'s shared numbers; ``max_weight`` defaults to the largest client's training examples."""
    s = cfg.secure_aggregation
    if not s.enabled:
        return None
    known = max((len(c.train) for c in fed.clients), default=0)
    return Masking(s.clipping_range, s.max_weight or known or DEPLOYED_MAX_WEIGHT)


def _start(
    spec: RunSpec, context: Context, model: nn.Module, label_names: tuple[str, ...]
) -> tuple[RunMetrics, list[np.ndarray], int]:
    """A new run's empty metrics and initial model (its head started from the label names where the scenario
    asks, :mod:`fedllm.head_prior`), or a resumed run's, cut back to its checkpoint."""
    run_dir = RunDir(spec.out_dir)
    cfg = spec.config
    if spec.resume:
        ckpt = run_dir.read_checkpoint()
        metrics = run_dir.read_metrics()
        metrics.rounds = [r for r in metrics.rounds if r.round <= ckpt.round]
        return metrics, ckpt.arrays, ckpt.round
    metrics = RunMetrics(
        run_id=spec.run_id or str(context.run_id),
        scenario=cfg.name,
        dp=cfg.privacy.enabled,
        rounds_planned=cfg.rounds,
        transport=spec.transport,
    )
    init_head(model, cfg.model, label_names)
    return metrics, get_trainable(model), 0


def run_federation(
    grid: Grid,
    context: Context,
    spec: RunSpec,
    on_round: Callable[[RoundRecord], None] | None = None,
    model: nn.Module | None = None,
) -> RunMetrics:
    """``model``: the coordinator's model when the lifecycle already built it (its checks), else built here."""
    cfg = spec.config
    started = time.monotonic()
    fed = federation_data(cfg)
    model = model if model is not None else build_model(cfg.model, len(fed.label_names))
    test = node_dataset(cfg.model, fed.central_test)  # tokens, or in head mode features computed once
    metrics, initial, done = _start(spec, context, model, fed.label_names)
    names = tuple(name for name, p in model.named_parameters() if p.requires_grad)  # what `fedllm export` maps
    masking = _masking(cfg, fed)
    with Ledger(spec.ledger_path) as ledger:
        recorder = Recorder(
            RunDir(spec.out_dir), ledger, metrics, config_hash(cfg), ModelRecord(names, fed.label_names), on_round
        )
        strategy = BudgetAwareFedAvg(
            initial_arrays=initial,
            round_offset=done,
            max_update_norm=cfg.max_update_norm,
            selection=Selection(cfg.num_clients, cfg.sampled_per_round, cfg.min_clients),
            recorder=recorder,
            evaluate_central=_central_evaluator(spec, model, test) if len(test) else None,
            federated_evaluation=cfg.federated_evaluation,
            masking=masking,
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds - done), strategy=strategy)
        secagg = fit_workflow(cfg.secure_aggregation, masking.max_weight) if masking else None
        list_nodes_once(grid, cfg.num_clients)  # a simulated federation's nodes never change once all joined
        DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
        metrics.wall_seconds = time.monotonic() - started
        recorder.save()
    return metrics


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


def server_app(
    spec: RunSpec | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    model: nn.Module | None = None,
) -> ServerApp:
    """The ServerApp: for a run the lifecycle already prepared (``fedllm simulate`` passes its spec and the
    model its checks built, so the driver builds it once), or one rebuilt from Flower's ``run_config``
    (``flwr run .``, ``fedllm run``), which it prepares itself."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if spec is not None:
            run_federation(grid, context, spec, on_round, model)
            return
        submitted = spec_from_run_config(context.run_config)
        check_simulated_nodes(grid, submitted.config)
        if not submitted.resume:
            RunDir(submitted.out_dir).write_config(submitted.config)
        run_federation(grid, context, submitted, on_round)

    return app


app = server_app()
