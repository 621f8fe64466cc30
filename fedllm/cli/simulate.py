"""``fedllm simulate``: a scenario with simulated clients on this machine (or a Ray cluster it joins)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedllm.cli.args import positive_float, positive_int
from fedllm.config import FederationConfig, load_config
from fedllm.errors import ConfigError


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser("simulate", help="run a scenario with simulated clients on this machine")
    sim.add_argument("scenario", nargs="?", default=None, help="a TOML path or built-in name (default: hospitals)")
    sim.add_argument("--rounds", type=positive_int("--rounds"))
    sim.add_argument("--clients", type=positive_int("--clients"), help="number of clients")
    sim.add_argument("--clients-per-round", type=positive_int("--clients-per-round"))
    sim.add_argument("--epsilon", type=positive_float("--epsilon"), help="every client's epsilon budget")
    sim.add_argument("--delta", type=positive_float("--delta"), help="every client's delta")
    sim.add_argument("--model", help="minilm (default), tiny-bert, or a local checkpoint path / hub id")
    sim.add_argument("--mode", choices=("lora", "last-layers", "full", "head", "head-lora"))
    sim.add_argument("--head-rounds", type=positive_int("--head-rounds"), help="head-lora: rounds of the head alone")
    sim.add_argument("--data", help="built-in name (medmcqa, banking77, medical-abstracts, synthetic) or a path")
    sim.add_argument("--text-column")
    sim.add_argument("--label-column")
    sim.add_argument("--partition", choices=("iid", "dirichlet", "per-file"))
    sim.add_argument("--alpha", type=positive_float("--alpha"))
    sim.add_argument("--local-steps", type=positive_int("--local-steps"))
    sim.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    sim.add_argument(
        "--ray-address", help="join a running Ray cluster (host:port of its head, or auto); never stopped by fedllm"
    )
    sim.add_argument("--num-cpus", type=positive_float("--num-cpus"), help="CPUs Ray reserves per client (default 1)")
    sim.add_argument(
        "--num-gpus", type=float, help="GPUs (or a fraction) per client (default 0: clients never touch a GPU)"
    )
    sim.add_argument("--out", type=Path, help="output directory (default: runs/<scenario>-<time>)")
    sim.add_argument("--no-dp", action="store_true", help="non-private baseline (epsilon = infinity)")
    sim.add_argument(
        "--no-secagg", action="store_true", help="send updates in clear to the coordinator (default: SecAgg+)"
    )
    sim.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last completed round")
    sim.add_argument("--quiet", action="store_true", help="no progress bar or table")
    sim.add_argument("--verbose", action="store_true", help="Flower and Ray logs")
    sim.set_defaults(handler=run)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a user gave, as the dotted config keys they set."""
    flags = {
        "rounds": args.rounds,
        "num_clients": args.clients,
        "clients_per_round": args.clients_per_round,
        "privacy.delta": args.delta,
        "model.name": args.model,
        "model.mode": args.mode,
        "model.head_rounds": args.head_rounds,
        "data.source": args.data,
        "data.text_column": args.text_column,
        "data.label_column": args.label_column,
        "data.partition": args.partition,
        "data.alpha": args.alpha,
        "training.local_steps": args.local_steps,
        "training.device": args.device,
        "simulation.ray_address": args.ray_address,
        "simulation.num_cpus": args.num_cpus,
        "simulation.num_gpus": args.num_gpus,
        "privacy.epsilon": args.epsilon,
    }
    out = {k: v for k, v in flags.items() if v is not None}
    if args.no_dp:
        out["privacy.enabled"] = False
    if args.no_secagg:
        out["secure_aggregation.enabled"] = False
    return out


def _apply_budget_flags(cfg: FederationConfig, args: argparse.Namespace) -> FederationConfig:
    """``--epsilon``/``--delta`` set every client's budget, including clients the scenario lists."""
    changes = {k: v for k, v in (("epsilon", args.epsilon), ("delta", args.delta)) if v is not None}
    if not changes:
        return cfg
    return replace(cfg, clients=tuple(replace(c, **changes) for c in cfg.clients))


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the run's stack (torch, Opacus, Flower, Ray) loads only for a simulation.
    from fedllm import progress
    from fedllm.run import lifecycle
    from fedllm.simulation import quiet_logs

    quiet_logs(args.verbose)
    if args.resume:
        if args.scenario or args.out or overrides_from(args):
            raise ConfigError("--resume: takes no scenario, --out or setting flags; the run keeps its own config.toml")
        spec, done = lifecycle.resume(args.resume)
    else:
        cfg, _ = load_config(args.scenario, overrides_from(args))
        spec, done = lifecycle.new(_apply_budget_flags(cfg, args), args.out), 0
    model = lifecycle.check(spec)
    started = time.monotonic()
    with progress.RoundProgress(spec.config.rounds, enabled=not args.quiet, completed=done) as bar:
        metrics = lifecycle.run(spec, on_round=bar.advance, verbose=args.verbose, model=model)
    if not args.quiet:
        progress.print_summary(metrics, spec.config, time.monotonic() - started, spec.out_dir)
    return 0
