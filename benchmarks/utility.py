"""Utility under privacy: accuracy of DP FedAvg at several epsilons vs non-private FedAvg vs centralized.

Two federations, MiniLM, ``max_length`` 64, in ``--mode`` (default ``head``: a linear head on the frozen
encoder's features, the recipe ``benchmarks/dp_recipe.py`` found; ``lora`` for the earlier setting):

* ``banks``: Banking77 (77 intents) over 10 banks, Dirichlet(alpha 0.5) label skew (simulations/banks.toml);
* ``medical``: the medical abstracts (5 conditions) over 5 hospitals, Dirichlet(alpha 1.0).

Every federated run is ``fedllm simulate`` on a scenario file this script writes (so the exact settings
are in the JSON), with delta 1e-5 per client. "Centralized" trains the same model non-privately on the
union of the clients' training sets for the same total number of optimizer steps the federation takes
(rounds x clients per round x local steps), batch and learning rate, and is scored on the same central
test set. Target: DP at epsilon 8 within 3 accuracy points of non-private FedAvg (issue 11). The recipe
itself (batch, learning rate, clipping, steps, rounds) is chosen by ``benchmarks/dp_recipe.py`` on public
data; this script checks it end to end through ``fedllm simulate`` (Flower, Ray, the client's ledger).

The defaults are sized for a 2-core CPU (a few minutes per run); raise ``--rounds``/``--local-steps``/
``--max-examples`` on a bigger machine. Secure aggregation is off here (``--no-secagg``): it changes the
aggregate only by rounding, and costs CPU time this benchmark spends on training instead.

Usage: ``python -m benchmarks.utility [--datasets medical banks] [--epsilons 8 3] [--rounds 4]
[--local-steps 10] [--max-examples 4000]``
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

import tomli_w

from benchmarks._common import RESULTS, quiet_env, table, write


def scenario(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rounds": args.rounds,
        "min_clients": 2,
        "seed": 0,
        "model": {"name": "minilm", "mode": args.mode, "max_length": 64},
        "training": {
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
        },
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "prv"},
    }
    if dataset == "banks":
        base.update({"name": "bench-banks", "num_clients": 10, "clients_per_round": 5})
        base["data"] = {
            "source": "banking77",
            "partition": "dirichlet",
            "alpha": 0.5,
            "test_fraction": 0.1,
            "max_central_test": args.max_central_test,
            "max_examples": args.max_examples,
        }
    elif dataset == "medical":
        base.update({"name": "bench-medical", "num_clients": 5, "clients_per_round": 5})
        base["data"] = {
            "source": "medical-abstracts",
            "partition": "dirichlet",
            "alpha": 1.0,
            "test_fraction": 0.1,
            "central_test_fraction": 0.15,
            "max_central_test": args.max_central_test,
            "max_examples": args.max_examples,
        }
    else:
        raise SystemExit(f"unknown dataset {dataset}")
    base["data"] = {k: v for k, v in base["data"].items() if v is not None}  # TOML has no null
    return base


def centralized(toml_path: str) -> dict[str, float]:
    """Non-private training on the pooled client data, same steps in total; runs in a child process."""
    import torch

    from fedllm.config import from_dict, read_toml
    from fedllm.data.federation import federation_data
    from fedllm.data.records import TextDataset
    from fedllm.features import node_dataset
    from fedllm.model import build_model, pick_device
    from fedllm.training import evaluate, train_plain

    cfg = from_dict(read_toml(Path(toml_path)), source=toml_path)
    fed = federation_data(cfg)
    pooled = TextDataset(
        texts=tuple(t for c in fed.clients for t in c.train.texts),
        labels=tuple(y for c in fed.clients for y in c.train.labels),
    )
    model = build_model(cfg.model, len(fed.label_names))
    device = pick_device(cfg.training.device)
    test = node_dataset(cfg.model, fed.central_test)
    _, initial = evaluate(model, test, batch_size=64, device=device)
    steps = cfg.rounds * cfg.sampled_per_round * cfg.training.local_steps
    torch.manual_seed(cfg.seed)
    train_plain(
        model,
        node_dataset(cfg.model, pooled),
        steps=steps,
        batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.learning_rate,
        device=device,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    loss, acc = evaluate(model, test, batch_size=64, device=device)
    return {"accuracy": acc, "loss": loss, "initial_accuracy": initial, "steps": steps, "train_examples": len(pooled)}


def run_variant(toml: Path, variant: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    if variant == "central":
        cmd = [sys.executable, "-m", "benchmarks.utility", "--central", str(toml)]
        res = _run(cmd)
        rec = json.loads(res.strip().splitlines()[-1])
    else:
        cmd = [sys.executable, "-m", "fedllm", "simulate", str(toml), "--quiet", "--no-secagg", "--out", str(out)]
        cmd += ["--no-dp"] if variant == "fedavg" else ["--epsilon", variant.removeprefix("eps")]
        _run(cmd)
        metrics = json.loads((out / "metrics.json").read_text())
        last = metrics["rounds"][-1]
        eps = [c["epsilon"] for r in metrics["rounds"] for c in r["clients"].values() if c.get("epsilon") is not None]
        rec = {
            "accuracy": last["accuracy"],
            "loss": last["loss"],
            "initial_accuracy": metrics["initial_accuracy"],
            "accuracy_per_round": [r["accuracy"] for r in metrics["rounds"]],
            "max_client_epsilon": max(eps) if eps else None,
            "rounds_completed": len(metrics["rounds"]),
        }
    rec["wall_s"] = time.perf_counter() - start
    return rec


def _run(cmd: list[str]) -> str:
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """A small SVG, hand-written (no plotting dependency): accuracy against epsilon per data set."""
    w, h, pad = 420, 260, 45
    colors = {"banks": "#1f77b4", "medical": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
    ]
    parts.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    xs = ["eps1", "eps3", "eps8", "fedavg", "central"]
    labels = ["eps 1", "eps 3", "eps 8", "no DP", "central"]
    x_at = {v: pad + i * (w - 2 * pad) / (len(xs) - 1) for i, v in enumerate(xs)}
    y_of = lambda acc: h - pad - acc * (h - 2 * pad)  # noqa: E731
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(tick)
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{pad - 5}" y="{y + 4:.1f}" text-anchor="end">{int(tick * 100)}%</text>')
    for v, lab in zip(xs, labels, strict=True):
        parts.append(f'<text x="{x_at[v]:.1f}" y="{h - pad + 16}" text-anchor="middle">{lab}</text>')
    for k, (name, res) in enumerate(results.items()):
        pts = [(x_at[v], y_of(res[v]["accuracy"])) for v in xs if v in res and "accuracy" in res[v]]
        color = colors.get(name, "#333")
        if pts:
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                + '"/>'
            )
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
        parts.append(f'<text x="{pad + 10}" y="{pad - 20 + 14 * k}" fill="{color}">{name}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">final central test accuracy vs privacy</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["medical", "banks"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 3.0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--max-examples", type=int, default=None, help="cut the training pool (default: all)")
    parser.add_argument("--mode", default="head", choices=["head", "lora", "last-layers", "full"])
    parser.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch per client")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--max-central-test", type=int, default=500)
    parser.add_argument("--central", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_env()
    if args.central:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(centralized(args.central)))
        return
    name = "utility_" + "_".join(args.datasets)
    variants = ["central", "fedavg", *[f"eps{e:g}" for e in sorted(args.epsilons, reverse=True)]]
    results: dict[str, dict[str, Any]] = {}
    scenarios: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedllm-utility-") as tmp:
        for dataset in args.datasets:
            sc = scenario(dataset, args)
            scenarios[dataset] = sc
            toml = Path(tmp) / f"{dataset}.toml"
            toml.write_text(tomli_w.dumps(sc))
            results[dataset] = {}
            for variant in variants:
                try:
                    rec = run_variant(toml, variant, Path(tmp) / f"{dataset}-{variant}")
                except RuntimeError as exc:
                    rec = {"error": str(exc)[-2000:]}
                    print(rec["error"], file=sys.stderr)
                results[dataset][variant] = rec
                acc = rec.get("accuracy")
                rows.append(
                    [
                        dataset,
                        variant,
                        "-" if acc is None else f"{100 * acc:.1f}%",
                        "-" if rec.get("initial_accuracy") is None else f"{100 * rec['initial_accuracy']:.1f}%",
                        "-" if rec.get("max_client_epsilon") is None else f"{rec['max_client_epsilon']:.2f}",
                        f"{rec.get('wall_s', 0):.0f}",
                    ]
                )
                print(table(["data", "run", "accuracy", "before", "max client eps", "wall s"], rows[-1:]), flush=True)
                write(name, {"scenarios": scenarios, "results": results, "partial": True})
    gaps = {
        d: 100 * (r["fedavg"]["accuracy"] - r["eps8"]["accuracy"])
        for d, r in results.items()
        if "accuracy" in r.get("fedavg", {}) and "accuracy" in r.get("eps8", {})
    }
    print()
    print(table(["data", "run", "accuracy", "before", "max client eps", "wall s"], rows))
    for d, gap in gaps.items():
        print(f"{d}: non-private FedAvg - DP eps 8 = {gap:.1f} points (target <= 3)")
    plot(results, RESULTS / f"{name}.svg")
    print(f"\nwrote {write(name, {'scenarios': scenarios, 'results': results, 'gap_points_eps8': gaps})}")


if __name__ == "__main__":
    main()
