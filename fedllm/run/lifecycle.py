"""A simulated run from start to end: new or resume -> checks -> prepare -> engine -> finish -> reports.

Every way of simulating a federation (``fedllm simulate``, an empirical audit's re-run, the soak test, the
benchmarks) goes through here, so each step happens once and in this order:

1. :func:`new` or :func:`resume`: where the run lives; a resumed run keeps its own ``config.toml``, ledger
   and run id, and is refused when any of them no longer matches;
2. :func:`check`: data, model and every client's mechanism, so bad input fails before anything starts;
3. :func:`prepare`: ``config.toml`` for a new run, and an empirical audit's canaries before any client runs;
4. the engine (:mod:`fedllm.simulation`) runs the one ServerApp and ClientApp (:mod:`fedllm.apps`);
5. finish: the empirical audit's adversary on the final model;
6. reports, also for a run that stopped early or broke off, as soon as it has a ledger.

A deployed run has the same ServerApp; there the ServerApp prepares its own directory (``flwr run``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from torch import nn

from fedllm.apps.client import client_app
from fedllm.apps.server import server_app
from fedllm.audit import canaries, empirical_attack
from fedllm.budget import plan_mechanism
from fedllm.config import FederationConfig, config_hash
from fedllm.data.federation import NODE_SOURCE, federation_data
from fedllm.errors import ConfigError
from fedllm.ledger import Ledger
from fedllm.metrics import RoundRecord, RunMetrics
from fedllm.model import build_model, load_tokenizer, pick_device
from fedllm.report.write import write_reports
from fedllm.run.rundir import RunDir
from fedllm.run.spec import RunSpec
from fedllm.simulation import run_engine


def new(cfg: FederationConfig, out: Path | None = None) -> RunSpec:
    """A fresh run in ``out`` (default ``runs/<scenario>-<time>``), never on top of another run's ledger."""
    out = out or Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if RunDir(out).ledger_path.exists():
        raise ConfigError(f"--out: {out} already holds a run's ledger; resume it with --resume or choose another")
    return RunSpec(config=cfg, out_dir=out.resolve())


def resume(out: Path) -> tuple[RunSpec, int]:
    """The run in ``out`` with exactly the config it started with, and the rounds it completed.

    Refused, with nothing modified, when its ledger fails its chain check, its ``config.toml`` changed
    since the checkpoint, or it is already complete.
    """
    run_dir = RunDir(out.resolve())
    cfg = run_dir.read_config()
    ckpt = run_dir.read_checkpoint()
    with Ledger(run_dir.ledger_path) as ledger:
        broken = ledger.verify_chain()
    if broken:
        raise ConfigError(f"--resume: {run_dir.ledger_path} failed its integrity check ({broken[0]})")
    if ckpt.config_hash != config_hash(cfg):
        raise ConfigError(f"--resume: {run_dir.config_path} changed since the run started; refusing to resume")
    metrics = run_dir.read_metrics()
    if metrics.stopped_early or ckpt.round >= cfg.rounds:
        raise ConfigError(
            f"--resume: the run in {run_dir.root} is already complete ({ckpt.round} of {cfg.rounds} rounds)"
        )
    return RunSpec(config=cfg, out_dir=run_dir.root, resume=True, run_id=metrics.run_id), ckpt.round


def check(spec: RunSpec) -> nn.Module:
    """Load the data, build the coordinator's model and plan every client's mechanism now, so bad input fails
    before Ray starts; the model is the one :func:`run` hands the ServerApp (built once in this process)."""
    cfg = spec.config
    if cfg.data.source == NODE_SOURCE:
        raise ConfigError(
            f"data.source: '{NODE_SOURCE}' is for a deployed run (fedllm run, docs/deployment.md); a simulation"
            " needs the data itself"
        )
    pick_device(cfg.training.device)
    fed = federation_data(cfg)
    load_tokenizer(cfg.model.name)
    model = build_model(cfg.model, len(fed.label_names))
    for split in fed.clients:
        if len(split.train) == 0:
            raise ConfigError(f"client '{split.client_id}': no training examples after partitioning")
        if cfg.privacy.enabled:
            settings = cfg.client_settings(split.client_id)
            plan_mechanism(settings, num_examples=len(split.train), source=f"client '{split.client_id}'")
    return model


def prepare(spec: RunSpec) -> None:
    """What must exist before the first client runs: ``config.toml`` of a new run, an audit's canaries."""
    if not spec.resume:
        RunDir(spec.out_dir).write_config(spec.config)
    canaries.prepare(spec)


def run(
    spec: RunSpec,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    verbose: bool = False,
    model: nn.Module | None = None,
) -> RunMetrics:
    """Steps 3 to 6 of a run that passed :func:`check` (``model``: what it returned)."""
    run_dir = RunDir(spec.out_dir)
    try:
        prepare(spec)
        run_engine(spec.config, server_app(spec, on_round, model), client_app(spec), verbose)
        empirical_attack.finish(spec)  # the adversary's guesses on the final model, and the lower bound
        return run_dir.read_metrics()
    finally:
        if run_dir.ledger_path.exists():
            write_reports(run_dir.root)


def simulate(
    spec: RunSpec, *, on_round: Callable[[RoundRecord], None] | None = None, verbose: bool = False
) -> RunMetrics:
    """The whole lifecycle for a spec from :func:`new` or :func:`resume`."""
    return run(spec, on_round=on_round, verbose=verbose, model=check(spec))
