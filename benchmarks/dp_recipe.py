"""The DP recipe study: which settings make private federated models worth having, found by experiment.

The federation is reproduced in one process, with the product's own pieces: the scenario's partition
(``fedllm.data.federation.federation_data``, the very split ``fedllm simulate`` makes), the frozen-encoder features
(``fedllm.features``), ``fedllm.training.train_dp`` (Opacus, Poisson sampling at the planned rate, per-sample
clipping, noise every step, the client's accountant kept across rounds) and ``train_plain`` for the
non-private baseline, noise calibrated once per client for its whole planned schedule
(``fedllm.accounting.calibrate_noise``), example-weighted FedAvg of the head, clients sampled per round as
the scenario says. No Flower, Ray or SecAgg+: those change the aggregate only by rounding and cost the
CPU time this study spends on training. (``fedllm simulate`` of the default scenario is measured
separately, see docs/benchmarks.md.)

Tuning on public data. Every choice below is scored on a *validation* set: the clients' own held-out
test rows pooled (never trained on), not on the central test set the targets table reports. The data are
public benchmark sets standing in for the institutions' records, so choosing on them spends no real
privacy. A real consortium must not tune on its members' private data without accounting for it
(Papernot & Steinke 2022: every trial is one more release); it should take these defaults as they are.

Sub-commands::

    python -m benchmarks.dp_recipe grid   --scenario banks     # one-factor sweeps around a base recipe
    python -m benchmarks.dp_recipe table  --seeds 0 1 2        # the targets table at full size
    python -m benchmarks.dp_recipe curve  --scenario hospitals # accuracy vs epsilon (SVG)

Results go to ``benchmarks/results/dp_recipe_*.json`` (with the command and the machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, quiet_env, table, write

SCENARIOS = {"banks": "banks", "medical": "medical", "hospitals": "hospitals"}


@dataclass(frozen=True)
class Recipe:
    """The knobs the study varies. ``batch_size`` is the expected (logical) Poisson batch per client."""

    mode: str = "head"
    head_hidden: int = 0
    batch_size: int = 256
    learning_rate: float = 0.05
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    local_steps: int = 10
    rounds: int = 10
    clients_per_round: int | None = None  # None: the scenario's
    project: int = 0  # > 0: features projected on this many principal axes of ANOTHER public data set
    # Public priors (no privacy spent: they read only the label schema or another public set). Off by default.
    center: str = ""  # "medmcqa" / "banking77": subtract that public set's mean feature; "label-names": theirs
    head_init: str = "zero"  # "label-names": weight rows = init_scale * (embedded label name); bias 0
    init_scale: float = 10.0
    label_template: str = "{}"  # the text each label name is embedded as, e.g. "a customer asks about {}"


def scenario_raw(name: str) -> dict[str, Any]:
    """The scenario as the study runs it: the shipped TOML for banks/hospitals; medical abstracts over five
    hospitals (Dirichlet 1.0) has no shipped file, so it is defined here."""
    from fedllm.config import SCENARIO_DIR, read_toml

    if name == "medical":
        return {
            "name": "medical",
            "num_clients": 5,
            "seed": 0,
            "model": {"name": "minilm", "max_length": 64},
            "data": {
                "source": "medical-abstracts",
                "partition": "dirichlet",
                "alpha": 1.0,
                "test_fraction": 0.1,
                "central_test_fraction": 0.15,
                "max_central_test": 1000,
            },
        }
    raw = read_toml(SCENARIO_DIR / f"{name}.toml")
    raw = copy.deepcopy(raw)
    raw.get("data", {}).pop("max_examples", None)
    return raw


def federation(name: str, seed: int):
    """(config, FederatedData) of the scenario at full size with this seed (partition and training)."""
    from fedllm.config import from_dict
    from fedllm.data.federation import federation_data

    raw = scenario_raw(name)
    raw["seed"] = seed
    raw.setdefault("model", {})["mode"] = "head"
    cfg = from_dict(raw, source=f"benchmarks.dp_recipe:{name}")
    return cfg, federation_data(cfg)


def _feature_sets(cfg, fed):
    from fedllm.data.records import TextDataset
    from fedllm.features import FeatureDataset

    train = [FeatureDataset(c.train, cfg.model) for c in fed.clients]
    val_text = TextDataset(
        texts=tuple(t for c in fed.clients for t in c.test.texts),
        labels=tuple(y for c in fed.clients for y in c.test.labels),
    )
    return train, FeatureDataset(val_text, cfg.model), FeatureDataset(fed.central_test, cfg.model)


def _projected(name: str, dims: int, sets: list, model_cfg) -> tuple[list, Any, Any]:
    """Fewer parameters for the same features: project on the top principal axes of a *different* public
    data set (MedMCQA for Banking77, Banking77 otherwise), so no client's data shapes the projection."""
    import torch

    from fedllm.config import DataConfig
    from fedllm.data.sources import load_source
    from fedllm.features import FeatureDataset, features

    other = load_source(DataConfig(source="medmcqa" if name == "banks" else "banking77"), 0)
    public = torch.from_numpy(features(model_cfg, [r.text for r in other.pool]))
    mean = public.mean(0)
    _, _, v = torch.pca_lowrank(public - mean, q=dims, center=False)
    out = [
        FeatureDataset.from_arrays(torch.nn.functional.normalize((d.features - mean) @ v, dim=1), d.labels)
        for d in sets
    ]
    return out[:-2], out[-2], out[-1]


def label_texts(label_names: Sequence[str], template: str = "{}") -> list[str]:
    """The public label schema as text: ``card_arrival`` -> ``card arrival``, put in ``template``."""
    from fedllm.head_prior import label_text

    return [template.format(label_text(n)) for n in label_names]


def label_embeddings(model_cfg, label_names: Sequence[str], template: str = "{}") -> Any:
    """(labels, dim) tensor: each label's text through the same frozen encoder and pooling as the examples
    (``fedllm.features.features``: mean-pooled, L2-normalised). Public: it reads only the label names."""
    import torch

    from fedllm.features import features

    return torch.from_numpy(features(model_cfg, label_texts(label_names, template)))


def public_mean(source: str, model_cfg, label_vectors: Any = None) -> Any:
    """The centering vector, from public data only: the mean feature of another public data set's pool
    (``medmcqa``, ``banking77``...) or, for ``label-names``, the mean of the embedded label names. The
    features of any one text set share a large common direction; per-example gradients of a softmax head
    are (p - y) x^T, so that direction spends clipping norm on every example and carries no class signal."""
    import torch

    from fedllm.config import DataConfig
    from fedllm.data.sources import load_source
    from fedllm.features import features

    if source == "label-names":
        return label_vectors.mean(0)
    pool = load_source(DataConfig(source=source), 0).pool
    return torch.from_numpy(features(model_cfg, [r.text for r in pool])).mean(0)


def centered(x: Any, mean: Any) -> Any:
    """``normalize(x - mean)`` row-wise: the features (and label vectors) as the head sees them."""
    import torch

    return torch.nn.functional.normalize(x - mean, dim=-1)


def run_federated(
    name: str, recipe: Recipe, epsilon: float | None, seed: int, *, keep_curve: bool = False
) -> dict[str, Any]:
    """One federated run of the recipe; ``epsilon`` None is non-private FedAvg. Returns accuracies and times."""
    import torch

    from fedllm.accounting import epsilon_of, make_accountant
    from fedllm.budget import _calibrated as calibrate_noise  # the product's own, memoized per process
    from fedllm.features import FeatureDataset
    from fedllm.head_prior import set_rows
    from fedllm.model import build_head, get_trainable, set_trainable
    from fedllm.training import DPSettings, evaluate, train_dp, train_plain

    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg, fed = federation(name, seed)
    model_cfg = replace(cfg.model, mode=recipe.mode, head_hidden=recipe.head_hidden)
    train, val, test = _feature_sets(cfg, fed)
    if recipe.project and (recipe.center or recipe.head_init != "zero"):
        raise ValueError("project does not combine with center / head_init in this study")
    if recipe.project:
        train, val, test = _projected(name, recipe.project, [*train, val, test], model_cfg)
    labels_vec = None
    if recipe.head_init == "label-names" or recipe.center == "label-names":
        labels_vec = label_embeddings(model_cfg, fed.label_names, recipe.label_template)
    if recipe.center:
        mean = public_mean(recipe.center, model_cfg, labels_vec)
        train, val, test = (
            [FeatureDataset.from_arrays(centered(d.features, mean), d.labels) for d in train],
            FeatureDataset.from_arrays(centered(val.features, mean), val.labels),
            FeatureDataset.from_arrays(centered(test.features, mean), test.labels),
        )
        labels_vec = None if labels_vec is None else centered(labels_vec, mean)
    prep_wall = time.perf_counter() - wall0
    num_labels = len(fed.label_names)
    head = build_head(model_cfg, num_labels)
    if recipe.head_init == "label-names":
        set_rows(head, labels_vec, recipe.init_scale)  # the product's label-name start (fedllm.head_prior)
    elif recipe.head_init != "zero":
        raise ValueError(f"unknown head_init {recipe.head_init!r}")
    if recipe.project:
        from fedllm.model import FeatureHead

        head = FeatureHead(recipe.project, num_labels, recipe.head_hidden, model_cfg.seed)
    device = torch.device("cpu")
    delta = cfg.privacy.delta
    per_round = recipe.clients_per_round or cfg.sampled_per_round
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    accountants = [make_accountant("prv") for _ in train]
    rates = [min(1.0, recipe.batch_size / max(1, len(d))) for d in train]
    # One calibration per run, at the largest client rate (the smallest client): every client gets at least
    # the noise its own plan would, so each spends at most epsilon (reported below). The product calibrates
    # per client (fedllm.budget.plan_mechanism); a PRV calibration costs 5-15 s here, ten per run was the
    # study's largest cost, and the clients' rates differ by a few percent.
    q_max = max(rates)
    sigma = (
        None
        if epsilon is None or recipe.rounds == 0  # 0 rounds: the initial head alone (zero-shot)
        else calibrate_noise(epsilon, delta, q_max, recipe.rounds * recipe.local_steps, "prv")
    )
    sigmas = [sigma for _ in train]
    global_arrays = get_trainable(head)
    curve = []
    for _ in range(recipe.rounds):
        chosen = sorted(rng.choice(len(train), size=per_round, replace=False).tolist())
        updates, weights = [], []
        for k in chosen:
            if len(train[k]) == 0:
                continue
            set_trainable(head, global_arrays)
            if epsilon is None:
                train_plain(
                    head,
                    train[k],
                    steps=recipe.local_steps,
                    batch_size=recipe.batch_size,
                    learning_rate=recipe.learning_rate,
                    device=device,
                    generator=gen,
                    optimizer=recipe.optimizer,
                )
            else:
                train_dp(
                    head,
                    train[k],
                    steps=recipe.local_steps,
                    batch_size=recipe.batch_size,
                    learning_rate=recipe.learning_rate,
                    dp=DPSettings(sigmas[k], recipe.max_grad_norm, "head", sample_rate=rates[k]),
                    accountant=accountants[k],
                    device=device,
                    generator=gen,
                    optimizer=recipe.optimizer,
                )
            updates.append(get_trainable(head))
            weights.append(len(train[k]))
        total = float(sum(weights))
        global_arrays = [
            sum(w / total * u[i] for u, w in zip(updates, weights, strict=True)) for i in range(len(updates[0]))
        ]
        if keep_curve:
            set_trainable(head, global_arrays)
            curve.append(evaluate(head, test, batch_size=4096, device=device)[1])
    set_trainable(head, global_arrays)
    val_acc = evaluate(head, val, batch_size=4096, device=device)[1]
    test_loss, test_acc = evaluate(head, test, batch_size=4096, device=device)
    # the client with the largest rate spent the most: its epsilon bounds everyone's
    worst = accountants[rates.index(q_max)]
    eps_spent = [epsilon_of("prv", worst.history, delta)] if epsilon and worst.history else []
    labels = np.asarray(test.labels)
    return {
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "majority_share": float(np.bincount(labels).max() / len(labels)),
        "max_client_epsilon": max(eps_spent) if eps_spent else None,
        "noise_multipliers": [s for s in sigmas if s is not None],
        "train_examples": [len(d) for d in train],
        "curve": curve,
        "feature_prep_wall_s": prep_wall,
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }


def run_central(name: str, seed: int, epochs: int = 30, batch_size: int = 256, lr: float = 0.05) -> dict[str, Any]:
    """Centralized non-private: the same head trained on the pooled client data (AdamW, shuffled)."""
    import torch

    from fedllm.features import FeatureDataset
    from fedllm.model import build_head
    from fedllm.training import evaluate, train_plain

    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg, fed = federation(name, seed)
    train, val, test = _feature_sets(cfg, fed)
    pooled = FeatureDataset.from_arrays(torch.cat([d.features for d in train]), torch.cat([d.labels for d in train]))
    head = build_head(cfg.model, len(fed.label_names))
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(pooled) / batch_size)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cpu")
    train_plain(head, pooled, steps=steps, batch_size=batch_size, learning_rate=lr, device=dev, generator=gen)
    return {
        "val_accuracy": evaluate(head, val, batch_size=4096, device=dev)[1],
        "test_accuracy": evaluate(head, test, batch_size=4096, device=dev)[1],
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }


# ------------------------------------------------------------------------------------------------ grid


def cmd_grid(args: argparse.Namespace) -> None:
    """The given trials (JSON objects of :class:`Recipe` fields, plus ``eps``: null for non-private), one
    seed, scored on validation. A full factorial grid does not fit 2 shared cores (a DP run of 1,000 head
    steps costs about 50 s of CPU), so the study moves one or two factors at a time from a base point."""
    records, rows = [], []
    for spec in args.trials:
        fields = json.loads(spec)
        eps = fields.pop("eps", args.epsilon)
        recipe = Recipe(**fields)
        res = run_federated(args.scenario, recipe, eps, args.seed)
        records.append({"trial": spec, "epsilon": eps, "recipe": asdict(recipe), **res})
        rows.append(
            [
                spec,
                "no DP" if eps is None else f"{eps:g}",
                f"{100 * res['val_accuracy']:.1f}",
                f"{100 * res['test_accuracy']:.1f}",
                f"{res['wall_s']:.0f}",
                f"{res['cpu_s']:.0f}",
            ]
        )
        print(table(["trial", "eps", "val %", "test %", "wall s", "CPU s"], rows[-1:]), flush=True)
        name = f"dp_recipe_grid_{args.scenario}" + (f"_{args.tag}" if args.tag else "")
        write(name, {"scenario": args.scenario, "seed": args.seed, "trials": records})
    print(table(["trial", "eps", "val %", "test %", "wall s", "CPU s"], rows))


# ------------------------------------------------------------------------------------------------ table


def _mean_spread(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals),
        "min": min(vals),
        "max": max(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
    }


def cmd_table(args: argparse.Namespace) -> None:
    recipes = json.loads(Path(args.recipes).read_text()) if args.recipes else {}
    out: dict[str, Any] = {}
    for name in args.scenarios:
        recipe = Recipe(**recipes.get(name, {}))
        cells: dict[str, list[dict[str, Any]]] = {}
        variants: list[tuple[str, float | None]] = [("fedavg", None)] + [(f"eps{e:g}", e) for e in args.epsilons]
        for seed in args.seeds:
            cells.setdefault("central", []).append(run_central(name, seed))
            for label, eps in variants:
                cells.setdefault(label, []).append(run_federated(name, recipe, eps, seed))
                r = cells[label][-1]
                print(
                    f"{name} seed {seed} {label}: test {100 * r['test_accuracy']:.1f}% ({r['wall_s']:.0f} s)",
                    flush=True,
                )
        summary = {
            label: {
                "test_accuracy": _mean_spread([r["test_accuracy"] for r in runs]),
                "wall_s": _mean_spread([r["wall_s"] for r in runs]),
                "cpu_s": _mean_spread([r["cpu_s"] for r in runs]),
            }
            for label, runs in cells.items()
        }
        summary["majority_share"] = cells["fedavg"][0]["majority_share"]
        out[name] = {"recipe": asdict(recipe), "summary": summary, "runs": cells}
        write(
            "dp_recipe_table" + (f"_{args.tag}" if args.tag else ""),
            {"seeds": args.seeds, "epsilons": args.epsilons, "results": out},
        )
    rows = []
    for name, res in out.items():
        s = res["summary"]
        fed = s["fedavg"]["test_accuracy"]["mean"]
        for label in ("central", "fedavg", *[f"eps{e:g}" for e in args.epsilons]):
            a = s[label]["test_accuracy"]
            gap = "" if label in ("central", "fedavg") else f"{100 * (fed - a['mean']):.1f}"
            rows.append(
                [
                    name,
                    label,
                    f"{100 * a['mean']:.1f} [{100 * a['min']:.1f}-{100 * a['max']:.1f}]",
                    gap,
                    f"{s[label]['wall_s']['mean']:.0f}",
                    f"{s[label]['cpu_s']['mean']:.0f}",
                ]
            )
        rows.append([name, "majority share", f"{100 * s['majority_share']:.1f}", "", "", ""])
    print(table(["federation", "run", "test accuracy % mean [min-max]", "gap to FedAvg", "wall s", "CPU s"], rows))


# ------------------------------------------------------------------------------------------------ curve


def cmd_curve(args: argparse.Namespace) -> None:
    from fedllm.report.svg import accuracy_epsilon_chart

    recipes = json.loads(Path(args.recipes).read_text()) if args.recipes else {}
    series = {}
    for name in args.scenarios:
        recipe = Recipe(**recipes.get(name, {}))
        fedavg = run_federated(name, recipe, None, args.seed)["test_accuracy"]
        pts = [(e, run_federated(name, recipe, e, args.seed)["test_accuracy"]) for e in args.epsilons]
        series[name] = {"points": pts, "non_private": fedavg}
        print(name, pts, "no DP", fedavg, flush=True)
    path = RESULTS / "dp_recipe_curve.svg"
    path.write_text(
        accuracy_epsilon_chart({k: (v["points"], v["non_private"]) for k, v in series.items()}, standalone=True)
    )
    write("dp_recipe_curve", {"series": series, "svg": str(path)})
    print(f"wrote {path}")


def cmd_figure(args: argparse.Namespace) -> None:
    """One SVG from the results on disk: the curve runs (seed 0) where present, else the targets table's
    epsilon 3 and 8 means; dashed, each federation's non-private FedAvg."""
    from fedllm.report.svg import accuracy_epsilon_chart

    series: dict[str, tuple[list[tuple[float, float]], float | None]] = {}
    curve = RESULTS / "dp_recipe_curve.json"
    if curve.is_file():
        for name, v in json.loads(curve.read_text())["series"].items():
            series[name] = ([tuple(p) for p in v["points"]], v["non_private"])
    for path in sorted(RESULTS.glob("dp_recipe_table_*.json")):
        for name, res in json.loads(path.read_text())["results"].items():
            if name in series:
                continue
            s = res["summary"]
            pts = [(float(k[3:]), s[k]["test_accuracy"]["mean"]) for k in s if k.startswith("eps")]
            series[name] = (pts, s["fedavg"]["test_accuracy"]["mean"])
    title = "central test accuracy vs epsilon (DP FedAvg, head mode)"
    Path(args.out).write_text(accuracy_epsilon_chart(series, title=title, standalone=True))
    print(f"wrote {args.out}")


# ------------------------------------------------------------------------------------------ default run


def cmd_default(args: argparse.Namespace) -> None:
    """The default run as a new user starts it, ``fedllm simulate`` (hospitals, SecAgg+ on), DP then
    ``--no-dp``: wall time and the CPU time of the whole process tree (Ray's workers included), final
    accuracy, each client's epsilon. ``--cold`` starts from an empty feature cache (the first run on a
    machine embeds every text once); the no-DP run after it finds the features cached."""
    import os
    import subprocess
    import sys
    import tempfile

    from benchmarks._proctree import run_tree

    out = Path(args.out)
    env = dict(os.environ)
    if args.cold:
        env["FEDLLM_FEATURES"] = tempfile.mkdtemp(prefix="fedllm-features-")
    fedllm = [sys.executable, "-m", "fedllm", "simulate", *args.scenario, "--quiet"]
    record: dict[str, Any] = {"cold_feature_cache": args.cold}
    for label, flags in (("dp", []), ("no_dp", ["--no-dp"])):
        run_dir = out / label
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        load_before = os.getloadavg()
        tree = run_tree([*fedllm, "--out", str(run_dir), *flags], env=env, interval=1.0)
        if tree.returncode != 0:
            raise SystemExit(f"{label} failed:\n{tree.output[-3000:]}")
        m = json.loads((run_dir / "metrics.json").read_text())
        record[label] = {
            "command": " ".join(["fedllm simulate", *args.scenario, "--out", str(run_dir), *flags]),
            "wall_s": tree.wall_s,
            "tree_cpu_s": tree.cpu_s,
            "peak_pss_mb": tree.peak_pss_mb,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "initial_accuracy": m["initial_accuracy"],
            "accuracy_per_round": [r["accuracy"] for r in m["rounds"]],
            "client_epsilon": {
                cid: c.get("epsilon") for cid, c in m["rounds"][-1]["clients"].items() if c.get("epsilon") is not None
            },
        }
        print(label, json.dumps(record[label]), flush=True)
        write("dp_recipe_default_run", record)


def main(argv: Sequence[str] | None = None) -> None:
    quiet_env()
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: one thread per benchmark process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--scenario", choices=list(SCENARIOS), default="banks")
    g.add_argument("--epsilon", type=float, default=8.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trials", nargs="+", required=True, help="JSON objects of Recipe fields (+ eps)")
    g.add_argument("--tag", default="", help="suffix of the results file, so several grids can run at once")
    g.set_defaults(fn=cmd_grid)
    t = sub.add_parser("table")
    t.add_argument("--scenarios", nargs="+", default=["banks", "medical", "hospitals"])
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 3.0])
    t.add_argument("--recipes", help="JSON file: scenario -> Recipe fields (default: Recipe())")
    t.add_argument("--tag", default="", help="suffix of the results file, so several tables can run at once")
    t.set_defaults(fn=cmd_table)
    c = sub.add_parser("curve")
    c.add_argument("--scenarios", nargs="+", default=["banks", "medical", "hospitals"])
    c.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 3, 5, 8])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--recipes")
    c.set_defaults(fn=cmd_curve)
    f = sub.add_parser("figure")
    f.add_argument("--out", default="docs/dp_utility_curve.svg")
    f.set_defaults(fn=cmd_figure)
    d = sub.add_parser("default")
    d.add_argument("scenario", nargs="*", default=[], help="scenario (default: fedllm's default, hospitals)")
    d.add_argument("--out", default="runs/dp-recipe-default")
    d.add_argument("--cold", action="store_true", help="start from an empty feature cache")
    d.set_defaults(fn=cmd_default)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
