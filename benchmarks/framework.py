"""Framework overhead: wall time of ``fedllm simulate`` over a bare loop doing the same local training.

The bare loop is what a researcher would write without federation: one process, the same partition, the
same node data (``node_dataset``: token rows, or frozen-encoder feature rows in head mode), the same model
object, the same DP-SGD mechanism per client (``plan_mechanism``: noise calibrated for the schedule),
``train_dp`` for the same number of steps (with the clients' optimizer and, where the encoder runs, their
physical batch limit: Opacus' virtual steps), a FedAvg mean of the trainable tensors, and the same central
evaluation before training and after every round. Both sides run as fresh subprocesses and are timed from
launch to exit, alternately (sim, bare, sim, bare ...). What the ratio then charges to the framework: Ray
start-up and actors, Flower's messages (SecAgg+'s four exchanges per round by default), per-process
imports, model builds and noise calibration, ledgers, signatures, checkpoints, metrics and reports.

Both the wall-time ratio and the ratio of CPU time summed over each run's whole process tree are reported;
on a shared, overloaded machine the CPU-time ratio is the one that means something (wall time then
depends on what else runs), on a quiet machine the wall-time ratio is what a user feels. The simulation's
wall time outside its rounds, its first round (Ray and actor start-up) and its later rounds are reported
apart: start-up is a fixed cost that longer runs amortise, the later rounds are the per-round overhead.
The same split is made in CPU time: the simulation's process tree is sampled with the number of rounds its
``metrics.json`` holds (rewritten after every round), the bare loop reports its own CPU time after set-up
and after each round; "start-up" is launch to the end of round 1 on both sides (imports, Ray, actors, model
builds, the first round's training), "per round" the mean of the later rounds.

``--mode``/``--model`` set ``model.mode``/``model.name`` on both sides (``--mode lora``: a run where
training, not start-up, is most of the work); the result is ``results/framework[_<scenario>][_<mode>]
[_<model>][_no_secagg].json``.

Target: <= 1.2x for the default scenario (hospitals).

Usage: ``python -m benchmarks.framework [--scenario hospitals] [--mode lora] [--model tiny-bert] [--rounds N]
[--local-steps N] [--repeats 2] [--no-secagg] [--bare-threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import fmt, quiet_env, spread, table, write
from benchmarks._proctree import TreeRun, _sample, run_tree


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.rounds:
        out["rounds"] = args.rounds
    if args.local_steps:
        out["training.local_steps"] = args.local_steps
    if args.mode:
        out["model.mode"] = args.mode
    if args.model:
        out["model.name"] = args.model
    return out


def run_timeline(cmd: list[str], metrics: Path, interval: float = 0.5) -> tuple[TreeRun, list[float]]:
    """:func:`run_tree` (wall, tree CPU, peak PSS), plus the tree's CPU seconds when each round was recorded.

    ``metrics.json`` is rewritten after every round: the first sample that sees round k holds the CPU spent
    up to the end of round k (late by at most ``interval``).
    """
    import subprocess
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    cpu: dict[tuple[int, float], float] = {}
    peak = [0.0, 0.0, 0]
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout or []), daemon=True)
    reader.start()
    at_round: list[float] = []
    while proc.poll() is None:
        rss, pss, n = _sample(proc.pid, cpu)
        peak = [max(peak[0], rss), max(peak[1], pss), max(peak[2], n)]
        try:
            done = len(json.loads(metrics.read_text())["rounds"])
        except (OSError, ValueError, KeyError):
            done = 0
        at_round += [sum(cpu.values())] * (done - len(at_round))
        time.sleep(interval)
    wall = time.perf_counter() - start
    reader.join(timeout=5)
    tree = TreeRun(proc.returncode, wall, peak[0], peak[1], int(peak[2]), "".join(chunks), sum(cpu.values()))
    return tree, at_round


def _cpu_phases(at_round: list[float], total: float) -> dict[str, float | None]:
    """Launch to the end of round 1, the mean later round, and after the last round, in CPU seconds."""
    later = (at_round[-1] - at_round[0]) / (len(at_round) - 1) if len(at_round) > 1 else None
    return {
        "to_round1_cpu_s": at_round[0] if at_round else None,
        "per_later_round_cpu_s": later,
        "after_last_round_cpu_s": total - at_round[-1] if at_round else None,
    }


def bare(args: argparse.Namespace) -> dict[str, float]:
    """The same work with no federation; returns its own phase times (the wall time is taken outside)."""
    import numpy as np
    import torch

    from fedllm.accounting import make_accountant
    from fedllm.budget import plan_mechanism
    from fedllm.config import load_config
    from fedllm.data.federation import federation_data
    from fedllm.features import node_dataset
    from fedllm.model import build_model, get_trainable, pick_device, set_trainable
    from fedllm.training import DPSettings, evaluate, train_dp

    t0 = time.perf_counter()
    cfg, _ = load_config(args.scenario, _overrides(args))
    fed = federation_data(cfg)
    model = build_model(cfg.model, len(fed.label_names))
    device = pick_device(cfg.training.device)
    # what the clients and the coordinator train and score on: token rows, or feature rows in head mode
    train = {c.client_id: node_dataset(cfg.model, c.train) for c in fed.clients}
    test = node_dataset(cfg.model, fed.central_test)
    t = cfg.training
    plans = {
        cid: plan_mechanism(cfg.client_settings(cid), num_examples=len(data), source=cid) for cid, data in train.items()
    }
    accountants = {cid: make_accountant(cfg.client_settings(cid).accountant) for cid in train}
    setup = time.perf_counter() - t0
    setup_cpu = time.process_time()  # this process' CPU since launch: imports included
    round_cpu: list[float] = []
    global_arrays = get_trainable(model)
    evaluate(model, test, batch_size=t.eval_batch_size, device=device)
    rng = np.random.default_rng(cfg.seed)
    train_s = 0.0
    for _ in range(cfg.rounds):
        ids = list(train)
        if cfg.sampled_per_round < len(ids):
            ids = list(rng.choice(ids, cfg.sampled_per_round, replace=False))
        updates, weights = [], []
        for cid in ids:
            set_trainable(model, global_arrays)
            m = plans[cid]
            torch.seed()
            start = time.perf_counter()
            train_dp(
                model,
                train[cid],
                steps=m.steps,
                batch_size=t.batch_size,
                learning_rate=t.learning_rate,
                dp=DPSettings(m.noise_multiplier, m.max_grad_norm, cfg.model.mode, m.sample_rate),
                accountant=accountants[cid],
                device=device,
                max_physical_batch=None if cfg.model.mode == "head" else t.max_physical_batch,  # as the clients do
                optimizer=t.optimizer,
            )
            train_s += time.perf_counter() - start
            updates.append(get_trainable(model))
            weights.append(len(train[cid]))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_arrays = [sum(wi * u[i] for wi, u in zip(w, updates, strict=True)) for i in range(len(global_arrays))]
        set_trainable(model, global_arrays)
        evaluate(model, test, batch_size=t.eval_batch_size, device=device)
        round_cpu.append(time.process_time())
    return {
        "setup_s": setup,
        "train_s": train_s,
        "total_in_process_s": time.perf_counter() - t0,
        "setup_cpu_s": setup_cpu,
        "cpu_at_round_end_s": round_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="hospitals")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--mode", choices=("lora", "last-layers", "full", "head"), help="model.mode")
    parser.add_argument("--model", help="model.name (minilm, tiny-bert, ...)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-secagg", action="store_true")
    parser.add_argument(
        "--bare-threads",
        type=int,
        default=0,
        help="torch threads in the bare loop (0: torch's default). Ray gives each simulated client one thread;"
        " on a loaded machine a 2-thread process loses time to thread synchronisation, so 1 compares like for like",
    )
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_env()
    if args.bare:
        import warnings

        if args.bare_threads:
            import torch

            torch.set_num_threads(args.bare_threads)
        warnings.filterwarnings("ignore")
        print(json.dumps(bare(args)))
        return
    common = []
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    if args.local_steps:
        common += ["--local-steps", str(args.local_steps)]
    if args.mode:
        common += ["--mode", args.mode]
    if args.model:
        common += ["--model", args.model]
    bare_cmd = [sys.executable, "-m", "benchmarks.framework", "--bare", "--scenario", args.scenario, *common]
    bare_cmd += ["--bare-threads", str(args.bare_threads)]
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedllm-framework-") as tmp:
        for rep in range(args.repeats):
            sim_cmd = [sys.executable, "-m", "fedllm", "simulate", args.scenario, *common, "--quiet"]
            sim_cmd += ["--out", str(Path(tmp) / f"run{rep}")] + (["--no-secagg"] if args.no_secagg else [])
            sim, sim_at_round = run_timeline(sim_cmd, Path(tmp) / f"run{rep}" / "metrics.json")
            if sim.returncode != 0:
                print(sim.output[-3000:], file=sys.stderr)
                sys.exit(1)
            metrics = json.loads((Path(tmp) / f"run{rep}" / "metrics.json").read_text())
            plain = run_tree(bare_cmd, env=dict(os.environ))
            if plain.returncode != 0:
                print(plain.output[-3000:], file=sys.stderr)
                sys.exit(1)
            phases = json.loads(plain.output.strip().splitlines()[-1])
            # the bare loop's own clock misses only the interpreter's exit; charge that to "after"
            bare_cpu = _cpu_phases(phases["cpu_at_round_end_s"], plain.cpu_s)
            pair = {
                "sim_wall_s": sim.wall_s,
                "sim_round_seconds": [r["seconds"] for r in metrics["rounds"]],
                # launch to the first round and after the last (Ray, preflight, model builds, initial central
                # evaluation, reports, shutdown): the fixed cost that more rounds or more steps would amortise
                "sim_outside_rounds_s": sim.wall_s - sum(r["seconds"] for r in metrics["rounds"]),
                "sim_server_app_s": metrics.get("wall_seconds"),
                "sim_peak_pss_mb": sim.peak_pss_mb,
                "bare_wall_s": plain.wall_s,
                "bare_phases": phases,
                "bare_peak_pss_mb": plain.peak_pss_mb,
                "sim_cpu_s": sim.cpu_s,
                "bare_cpu_s": plain.cpu_s,
                "ratio": sim.wall_s / plain.wall_s,
                "cpu_ratio": sim.cpu_s / plain.cpu_s,
                "sim_cpu_at_round_end_s": sim_at_round,
                "sim_cpu_phases": _cpu_phases(sim_at_round, sim.cpu_s),
                "bare_cpu_phases": bare_cpu,
                "load_1min": os.getloadavg()[0],
            }
            pairs.append(pair)
            print(json.dumps(pair), flush=True)
    ratio = spread([p["ratio"] for p in pairs])
    cpu_ratio = spread([p["cpu_ratio"] for p in pairs])
    sim_s = spread([p["sim_wall_s"] for p in pairs])
    bare_s = spread([p["bare_wall_s"] for p in pairs])
    train_share = spread([p["bare_phases"]["train_s"] / p["bare_wall_s"] for p in pairs])
    outside = spread([p["sim_outside_rounds_s"] for p in pairs])
    first_round = spread([p["sim_round_seconds"][0] for p in pairs])
    later_rounds = spread([x for p in pairs for x in p["sim_round_seconds"][1:]] or [0.0])
    bare_setup = spread([p["bare_phases"]["setup_s"] for p in pairs])

    def cpu(side: str, key: str) -> str:
        values = [p[f"{side}_cpu_phases"][key] for p in pairs if p[f"{side}_cpu_phases"][key] is not None]
        return fmt(spread(values), 2, " CPU-s") if values else "-"

    sim_tree_cpu = fmt(spread([p["sim_cpu_s"] for p in pairs]), 1, " CPU-s")
    bare_tree_cpu = fmt(spread([p["bare_cpu_s"] for p in pairs]), 1, " CPU-s")
    rows = [
        ["simulate / bare loop, CPU time of the process trees", fmt(cpu_ratio), "<= 1.2x"],
        ["simulate / bare loop, wall time", fmt(ratio), "<= 1.2x"],
        ["simulate wall", fmt(sim_s, 1, " s"), ""],
        ["bare loop wall", fmt(bare_s, 1, " s"), ""],
        ["simulate wall outside rounds (start-up + wind-down)", fmt(outside, 1, " s"), ""],
        ["simulate round 1 (actors start: imports, model build, features)", fmt(first_round, 1, " s"), ""],
        ["simulate each later round", fmt(later_rounds, 1, " s"), ""],
        ["bare loop set-up (in process)", fmt(bare_setup, 1, " s"), ""],
        ["share of bare wall in train_dp", fmt(train_share, 2, ""), ""],
        ["simulate CPU, whole tree", sim_tree_cpu, ""],
        ["bare loop CPU", bare_tree_cpu, ""],
        ["simulate CPU, launch to end of round 1", cpu("sim", "to_round1_cpu_s"), ""],
        ["bare loop CPU, launch to end of round 1", cpu("bare", "to_round1_cpu_s"), ""],
        ["simulate CPU, each later round", cpu("sim", "per_later_round_cpu_s"), ""],
        ["bare loop CPU, each later round", cpu("bare", "per_later_round_cpu_s"), ""],
        ["simulate CPU, after the last round (reports, shutdown)", cpu("sim", "after_last_round_cpu_s"), ""],
        ["bare loop CPU, after the last round", cpu("bare", "after_last_round_cpu_s"), ""],
        ["1-minute load average at each pair's end", fmt(spread([p["load_1min"] for p in pairs]), 1, ""), ""],
    ]
    print(table(["what", "median [min-max]", "target"], rows))
    variant = [args.scenario if args.scenario != "hospitals" else "", args.mode or "", args.model or ""]
    name = "_".join(["framework", *(Path(v).stem for v in variant if v)]) + ("_no_secagg" if args.no_secagg else "")
    payload = {"scenario": args.scenario, "overrides": _overrides(args), "secagg": not args.no_secagg}
    payload.update({"ratio": ratio, "cpu_ratio": cpu_ratio, "pairs": pairs, "bare_threads": args.bare_threads})
    print(f"\nwrote {write(name, payload)}")


if __name__ == "__main__":
    main()
