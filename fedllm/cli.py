"""The ``fedllm`` command.

Bad input ends with one line, ``fedllm: error: <what, where>``, and a non-zero exit, before anything is
written: flags, scenario, data and per-client deltas are all checked before the simulation starts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import fedllm
from fedllm.errors import ConfigError, FedllmError

EXIT_USAGE = 2


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}: must be >= 1, got {value}")
        return value

    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected a number, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: must be a finite number > 0, got {text}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are our one-line format and exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedllm", description="Federated DP fine-tuning of BERT classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {fedllm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run a scenario with simulated clients on this machine")
    sim.add_argument("scenario", nargs="?", default=None, help="a TOML path or built-in name (default: hospitals)")
    sim.add_argument("--rounds", type=_positive_int("--rounds"))
    sim.add_argument("--clients", type=_positive_int("--clients"), help="number of clients")
    sim.add_argument("--clients-per-round", type=_positive_int("--clients-per-round"))
    sim.add_argument("--epsilon", type=_positive_float("--epsilon"), help="every client's epsilon budget")
    sim.add_argument("--delta", type=_positive_float("--delta"), help="every client's delta")
    sim.add_argument("--model", help="minilm (default), tiny-bert, or a local checkpoint path / hub id")
    sim.add_argument("--mode", choices=("lora", "last-layers", "full", "head"))
    sim.add_argument("--data", help="built-in name (medmcqa, banking77, medical-abstracts, synthetic) or a path")
    sim.add_argument("--text-column")
    sim.add_argument("--label-column")
    sim.add_argument("--partition", choices=("iid", "dirichlet", "per-file"))
    sim.add_argument("--alpha", type=_positive_float("--alpha"))
    sim.add_argument("--local-steps", type=_positive_int("--local-steps"))
    sim.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    sim.add_argument(
        "--ray-address", help="join a running Ray cluster (host:port of its head, or auto); never stopped by fedllm"
    )
    sim.add_argument("--num-cpus", type=_positive_float("--num-cpus"), help="CPUs Ray reserves per client (default 1)")
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
    from fedllm import audit, certs, compare, deploy, report

    audit.register(sub)
    compare.register(sub)
    report.register(sub)
    certs.register(sub)
    deploy.register(sub)
    from fedllm import export, predict

    export.register(sub)
    predict.register(sub)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        "rounds": args.rounds,
        "num_clients": args.clients,
        "clients_per_round": args.clients_per_round,
        "privacy.delta": args.delta,
        "model.name": args.model,
        "model.mode": args.mode,
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


def _apply_budget_flags(raw_cfg, args: argparse.Namespace):
    """``--epsilon``/``--delta`` set every client's budget, including clients the scenario lists."""
    from dataclasses import replace

    changes = {k: v for k, v in (("epsilon", args.epsilon), ("delta", args.delta)) if v is not None}
    if not changes:
        return raw_cfg
    return replace(raw_cfg, clients=tuple(replace(c, **changes) for c in raw_cfg.clients))


def preflight(spec) -> None:
    """Load the data and plan every client's mechanism now, so bad input fails before Ray starts."""
    from fedllm.budget import plan_mechanism
    from fedllm.data import NODE_SOURCE
    from fedllm.model import build_model, load_tokenizer, pick_device
    from fedllm.runspec import federation_data

    cfg = spec.config
    if cfg.data.source == NODE_SOURCE:
        raise ConfigError(
            f"data.source: '{NODE_SOURCE}' is for a deployed run (fedllm run, docs/deployment.md); a simulation"
            " needs the data itself"
        )
    pick_device(cfg.training.device)
    fed = federation_data(cfg)
    load_tokenizer(cfg.model.name)
    build_model(cfg.model, len(fed.label_names))
    for split in fed.clients:
        if len(split.train) == 0:
            raise ConfigError(f"client '{split.client_id}': no training examples after partitioning")
        if cfg.privacy.enabled:
            settings = cfg.client_settings(split.client_id)
            plan_mechanism(settings, num_examples=len(split.train), source=f"client '{split.client_id}'")


def resume_spec(args: argparse.Namespace):
    """A resumed run uses exactly the config it started with: any setting flag is an error, not a change."""
    from fedllm import checkpoint
    from fedllm import metrics as run_metrics
    from fedllm.config import config_hash, from_dict, read_toml
    from fedllm.ledger import Ledger
    from fedllm.runspec import RunSpec

    if args.scenario or args.out or overrides_from(args):
        raise ConfigError("--resume: takes no scenario, --out or setting flags; the run keeps its own config.toml")
    out = args.resume.resolve()
    cfg = from_dict(read_toml(out / "config.toml"), source=str(out / "config.toml"))
    ckpt = checkpoint.load(out / "checkpoint.npz")
    with Ledger(out / "ledger.sqlite") as ledger:
        broken = ledger.verify_chain()
    if broken:
        raise ConfigError(f"--resume: {out / 'ledger.sqlite'} failed its integrity check ({broken[0]})")
    if ckpt.config_hash != config_hash(cfg):
        raise ConfigError(f"--resume: {out / 'config.toml'} changed since the run started; refusing to resume")
    metrics = run_metrics.read(out / "metrics.json")
    if metrics.stopped_early or ckpt.round >= cfg.rounds:
        raise ConfigError(f"--resume: the run in {out} is already complete ({ckpt.round} of {cfg.rounds} rounds)")
    return RunSpec(config=cfg, out_dir=out, resume=True, run_id=metrics.run_id), ckpt.round


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedllm.config import load_config
    from fedllm.runspec import RunSpec
    from fedllm.simulation import quiet_logs

    quiet_logs(args.verbose)
    if args.resume:
        spec, done = resume_spec(args)
        cfg = spec.config
    else:
        cfg, _ = load_config(args.scenario, overrides_from(args))
        cfg = _apply_budget_flags(cfg, args)
        out = args.out or Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if (out / "ledger.sqlite").exists():
            raise ConfigError(f"--out: {out} already holds a run's ledger; resume it with --resume or choose another")
        spec, done = RunSpec(config=cfg, out_dir=out.resolve()), 0
    preflight(spec)
    from fedllm import progress
    from fedllm.report import write_reports
    from fedllm.simulation import simulate

    started = time.monotonic()
    try:
        with progress.RoundProgress(cfg.rounds, enabled=not args.quiet, completed=done) as bar:
            metrics = simulate(spec, on_round=bar.advance, verbose=args.verbose)
    finally:
        if (spec.out_dir / "ledger.sqlite").exists():
            write_reports(spec.out_dir)  # also for a run that stopped early or broke off
    wall = time.monotonic() - started
    if not args.quiet:
        progress.print_summary(metrics, cfg, wall, spec.out_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "simulate":
            return cmd_simulate(args)
        return args.handler(args)
    except FedllmError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
