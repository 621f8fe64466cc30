"""The coordinator's side of a run: initial model, central evaluation, ledger, and the FedAvg loop.

Runs inside Flower's ServerApp, in simulation and deployment alike, on the legacy workflow so that a
secure-aggregation fit workflow can replace the plain one without touching the strategy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid
from torch.utils.data import Dataset

from fedllm import checkpoint
from fedllm import metrics as run_metrics
from fedllm.config import FederationConfig, config_hash, to_toml
from fedllm.data import FederatedData
from fedllm.features import node_dataset
from fedllm.ledger import Ledger
from fedllm.metrics import RoundRecord, RunMetrics
from fedllm.model import build_model, get_trainable, pick_device, set_trainable
from fedllm.runspec import RunSpec, federation_data
from fedllm.secure_aggregation import Masking, fit_workflow
from fedllm.strategy import BudgetAwareFedAvg
from fedllm.training import evaluate

log = logging.getLogger("fedllm.server")


def _central_evaluator(spec: RunSpec, model, test: Dataset) -> Callable[[list[np.ndarray]], tuple]:
    device = pick_device(spec.config.training.device)

    def run(arrays: list[np.ndarray]) -> tuple[float, float]:
        set_trainable(model, arrays)
        return evaluate(model, test, batch_size=spec.config.training.eval_batch_size, device=device)

    return run


# max_weight where the coordinator holds no client's data (deployment): on the 2**30-step grid a client of
# 100 examples still lands within 1e-3 of its delta's values; larger clients are capped (and warned).
DEPLOYED_MAX_WEIGHT = 100_000


def _masking(cfg: FederationConfig, fed: FederatedData) -> Masking | None:
    """SecAgg+'s shared numbers; ``max_weight`` defaults to the largest client's training examples."""
    s = cfg.secure_aggregation
    if not s.enabled:
        return None
    known = max((len(c.train) for c in fed.clients), default=0)
    return Masking(s.clipping_range, s.max_weight or known or DEPLOYED_MAX_WEIGHT)


def run_federation(
    grid: Grid, context: Context, spec: RunSpec, on_round: Callable[[RoundRecord], None] | None = None
) -> RunMetrics:
    cfg = spec.config
    started = time.monotonic()
    fed = federation_data(cfg)
    model = build_model(cfg.model, len(fed.label_names))
    test = node_dataset(cfg.model, fed.central_test)  # tokens, or in head mode features computed once
    digest = config_hash(cfg)
    if spec.resume:
        ckpt = checkpoint.load(spec.out_dir / "checkpoint.npz")
        metrics = run_metrics.read(spec.out_dir / "metrics.json")
        metrics.rounds = [r for r in metrics.rounds if r.round <= ckpt.round]
        initial, done = ckpt.arrays, ckpt.round
    else:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        (spec.out_dir / "config.toml").write_text(to_toml(cfg))
        metrics = RunMetrics(
            run_id=spec.run_id or str(context.run_id),
            scenario=cfg.name,
            dp=cfg.privacy.enabled,
            rounds_planned=cfg.rounds,
            transport=spec.transport,
        )
        initial, done = get_trainable(model), 0

    names = tuple(name for name, p in model.named_parameters() if p.requires_grad)  # what `fedllm export` maps

    def save_checkpoint(round_: int, arrays: list[np.ndarray]) -> None:
        ckpt = checkpoint.Checkpoint(round_, metrics.run_id, digest, arrays, names=names, labels=fed.label_names)
        checkpoint.save(spec.out_dir / "checkpoint.npz", ckpt)

    masking = _masking(cfg, fed)
    with Ledger(spec.ledger_path) as ledger:
        strategy = BudgetAwareFedAvg(
            initial_arrays=initial,
            round_offset=done,
            max_update_norm=cfg.max_update_norm,
            on_checkpoint=save_checkpoint,
            num_clients=cfg.num_clients,
            clients_per_round=cfg.sampled_per_round,
            min_clients=cfg.min_clients,
            ledger=ledger,
            metrics=metrics,
            metrics_path=spec.out_dir / "metrics.json",
            config_hash=digest,
            evaluate_central=_central_evaluator(spec, model, test) if len(test) else None,
            federated_evaluation=cfg.federated_evaluation,
            on_round=on_round,
            masking=masking,
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds - done), strategy=strategy)
        secagg = fit_workflow(cfg.secure_aggregation, masking.max_weight) if masking else None
        DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
        metrics.wall_seconds = time.monotonic() - started
        strategy.save()
    return metrics


def main_for(spec: RunSpec | None, on_round: Callable[[RoundRecord], None] | None = None):
    """The ServerApp main: a fixed spec (``fedllm simulate``) or one rebuilt from ``run_config``."""
    from fedllm.runspec import spec_from_run_config

    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, spec or spec_from_run_config(context.run_config), on_round)

    return main


__all__ = ["main_for", "run_federation"]
