"""Scale: 1,000 simulated clients with 10 sampled per round (tiny-bert), against 100 clients.

Targets: the run completes, the whole process tree (driver, Ray's daemons and workers) peaks at <= 6 GB,
and the time per round at 1,000 clients is <= 1.2x the time per round at 100 clients. The two sizes are
run alternately (100, 1000, 100, 1000, ...) so machine load affects both; per-round time is the median
of each run's rounds from its ``metrics.json`` (``seconds`` per round), first round reported apart
because it pays for the workers' start-up (imports, model build, data partitioning). The synthetic data
set is fixed, so by default the smaller federation's pool is capped to give each client as many examples
as in the larger one (``--no-same-data-per-client`` to turn that off): per-round work is then the same.

Usage: ``python -m benchmarks.scale [--sizes 100 1000] [--repeats 2] [--rounds 5] [--per-round 10]
[-- extra fedllm simulate flags]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import fmt, quiet_env, spread, table, write
from benchmarks._proctree import run_tree

GB = 1024


def scenario_file(n: int, max_examples: int | None, tmp: Path) -> Path:
    """simulations/tiny.toml with ``n`` clients and, for the smaller federation, a capped data pool."""
    import tomli_w

    from fedllm.config import read_toml, scenario_path

    raw = read_toml(scenario_path("tiny"))
    raw["num_clients"] = n
    if max_examples is not None:
        raw.setdefault("data", {})["max_examples"] = max_examples
    path = tmp / f"tiny-{n}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def pool_size(n: int) -> int:
    """Training + local test rows the synthetic pool gives ``n`` clients (the central test set is apart)."""
    from fedllm.config import load_config
    from fedllm.runspec import federation_data

    cfg, _ = load_config("tiny", {"num_clients": n})
    return sum(len(c.train) + len(c.test) for c in federation_data(cfg).clients)


def one_run(n: int, args: argparse.Namespace, out: Path, scenario: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedllm.cli", "simulate", str(scenario), "--clients", str(n)]
    cmd += ["--clients-per-round", str(args.per_round), "--rounds", str(args.rounds), "--quiet", "--out", str(out)]
    cmd += args.extra
    tree = run_tree(cmd, env=dict(os.environ))
    rec: dict[str, Any] = {
        "clients": n,
        "returncode": tree.returncode,
        "wall_s": tree.wall_s,
        "peak_rss_mb": tree.peak_rss_mb,
        "peak_pss_mb": tree.peak_pss_mb,
        "peak_processes": tree.peak_processes,
    }
    metrics = out / "metrics.json"
    if tree.returncode != 0 or not metrics.exists():
        rec["error"] = tree.output[-3000:]
        return rec
    raw = json.loads(metrics.read_text())
    seconds = [r["seconds"] for r in raw["rounds"]]
    rec.update(
        {
            "rounds_completed": len(seconds),
            "round_seconds": seconds,
            "first_round_s": seconds[0],
            "later_round_median_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "trained_per_round": [sum(c["status"] == "trained" for c in r["clients"].values()) for r in raw["rounds"]],
            "examples_per_round": [sum(c.get("examples") or 0 for c in r["clients"].values()) for r in raw["rounds"]],
        }
    )
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs=2, type=int, default=[100, 1000], metavar=("BASE", "LARGE"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument(
        "--same-data-per-client",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cap the smaller federation's pool (data.max_examples) so each client holds as many examples as"
        " in the larger one: the synthetic pool is fixed, so otherwise 100 clients hold 10x the data of 1,000",
    )
    parser.add_argument("extra", nargs="*", help="more `fedllm simulate` flags, after --")
    args = parser.parse_args()
    quiet_env()
    base, large = args.sizes
    pool = pool_size(large)
    base_cap = max(base, round(pool * base / large)) if args.same_data_per_client else None
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedllm-scale-") as tmp:
        files = {base: scenario_file(base, base_cap, Path(tmp)), large: scenario_file(large, None, Path(tmp))}
        for rep in range(args.repeats):
            for n in (base, large):
                rec = one_run(n, args, Path(tmp) / f"n{n}-r{rep}", files[n])
                runs.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "error"}), flush=True)
                if "error" in rec:
                    print(rec["error"], file=sys.stderr)
    ok = [r for r in runs if "error" not in r]
    pairs = [(a, b) for a, b in zip(ok[0::2], ok[1::2], strict=False) if a["clients"] == base and b["clients"] == large]
    out: dict[str, Any] = {"sizes": args.sizes, "rounds": args.rounds, "per_round": args.per_round, "runs": runs}
    out.update({"pool_rows_at_large": pool, "base_max_examples": base_cap})
    rows = []
    if pairs:
        later = spread([b["later_round_median_s"] / a["later_round_median_s"] for a, b in pairs])
        allr = spread([statistics.mean(b["round_seconds"]) / statistics.mean(a["round_seconds"]) for a, b in pairs])
        wall = spread([b["wall_s"] / a["wall_s"] for a, b in pairs])
        out["ratio_later_rounds"], out["ratio_all_rounds"], out["ratio_wall"] = later, allr, wall
        rows += [
            [f"s/round (rounds 2..{args.rounds}), {large} / {base} clients", fmt(later), "<= 1.2x"],
            [f"s/round (all rounds, mean), {large} / {base} clients", fmt(allr), ""],
            [f"wall incl. start-up, {large} / {base} clients", fmt(wall), ""],
        ]
    for n in (base, large):
        mine = [r for r in ok if r["clients"] == n]
        if mine:
            rows.append(
                [f"{n} clients: later round s", fmt(spread([r["later_round_median_s"] for r in mine]), 2, " s"), ""]
            )
            rows.append([f"{n} clients: first round s", fmt(spread([r["first_round_s"] for r in mine]), 2, " s"), ""])
            rss, pss = (max(r[k] for r in mine) / GB for k in ("peak_rss_mb", "peak_pss_mb"))
            rows.append([f"{n} clients: peak tree RSS / PSS", f"{rss:.2f} / {pss:.2f} GB", "<= 6 GB"])
    failed = [r for r in runs if "error" in r]
    rows.append(["runs completed", f"{len(ok)} of {len(runs)}", "all"])
    print(table(["what", "median [min-max]", "target"], rows))
    print(f"\nwrote {write('scale', out)}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
