"""Scale: 100, 1,000 and 10,000 registered clients with 10 sampled per round (tiny-bert): cost follows the sampled.

Targets: every run completes, the whole process tree (driver, Ray's daemons and workers) peaks at <= 6 GB,
and the time per round at the largest federation is <= 1.2x the time per round at the smallest. The sizes
run in turn (100, 1000, 10000, 100, ...) so machine load affects all; per-round time is the median of
each run's rounds from its ``metrics.json`` (``seconds`` per round, the first round reported apart: it pays
for the workers' start-up). Start-up (launch until the coordinator has evaluated the initial model and
writes its first ``metrics.json``, i.e. until round 1 starts) and teardown (after the last round to exit)
are measured apart from the rounds.

Data: the built-in synthetic set is fixed at 2,000 rows, too few for 10,000 clients, so the benchmark writes
the same kind of keyword task (each label's rows carry three of its keywords among filler words) to a JSONL
file with ``--rows-per-client`` rows for every client of the largest federation, and caps every smaller
federation's pool (``data.max_examples``) to the same rows per client: a round then does the same work at
every size, and only the number of registered clients differs.

``--sample-driver`` also samples the driver's Python stacks (every thread: Flower runs the ServerApp in a
thread, so ``python -m cProfile`` would see only the main one) every 20 ms and writes the functions seen
most often, inclusive, per phase (start-up / rounds), for the largest size's first repeat:
``benchmarks/results/<name>_profile_<N>.txt`` (``--name``, default ``scale``).

Usage: ``python -m benchmarks.scale [--sizes 100 1000 10000] [--repeats 2] [--rounds 4] [--per-round 10]
[--rows-per-client 3] [--sample-driver] [-- extra fedllm simulate flags]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import runpy
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, fmt, quiet_env, spread, table, write
from benchmarks._proctree import run_tree

GB = 1024
TINY = Path(__file__).resolve().parent.parent / "simulations" / "tiny.toml"
CENTRAL_TEST = 200  # tiny.toml's max_central_test: rows held out for the coordinator before partitioning
_KEYWORDS = {
    "alpha": ("apple", "anchor", "arrow", "amber", "atlas"),
    "beta": ("banana", "bridge", "button", "breeze", "bottle"),
    "gamma": ("garden", "guitar", "galaxy", "glacier", "goblet"),
    "delta": ("dragon", "desert", "diamond", "dolphin", "drum"),
}
_FILLER = tuple(
    "the a of and to in is was for on with as by at from this that it we they said today very some more "
    "about after before while where when then there here other people day week year new old".split()
)


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    """A keyword task of ``rows`` rows as JSONL (text, label): the synthetic source's recipe, any size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = sorted(_KEYWORDS)
    with path.open("w") as f:
        for i in range(rows):
            label = labels[i % len(labels)]
            words = [*rng.choice(_FILLER, size=9), *rng.choice(_KEYWORDS[label], size=3, replace=False)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(map(str, words)), "label": label}) + "\n")


def scenario_file(n: int, data: Path, max_examples: int, tmp: Path) -> Path:
    """simulations/tiny.toml with ``n`` clients on the generated data, capped to ``max_examples`` rows."""
    import tomli_w

    raw = tomllib.loads(TINY.read_text())
    raw["num_clients"] = n
    raw.setdefault("data", {}).update(
        {"source": str(data), "max_examples": max_examples, "max_central_test": CENTRAL_TEST}
    )
    path = tmp / f"tiny-{n}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


class _FirstMetrics:
    """When ``metrics.json`` first appears: the coordinator writes it after the initial evaluation, just
    before round 1's sampling, so launch to then is the run's start-up."""

    def __init__(self, path: Path, start: float):
        self.path, self.start, self.seen = path, start, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.seen is None:
            if self.path.exists():
                self.seen = time.perf_counter() - self.start
            time.sleep(0.05)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join(timeout=1)
        return self.seen


def one_run(n: int, args: argparse.Namespace, out: Path, scenario: Path, profile: Path | None) -> dict[str, Any]:
    flags = ["simulate", str(scenario), "--clients", str(n), "--clients-per-round", str(args.per_round)]
    flags += ["--rounds", str(args.rounds), "--quiet", "--out", str(out), *args.extra]
    if profile is not None:
        cmd = [sys.executable, "-m", "benchmarks.scale", "--sampled-driver", str(profile), "--", *flags]
    else:
        cmd = [sys.executable, "-m", "fedllm", *flags]
    load_before = os.getloadavg()
    watch = _FirstMetrics(out / "metrics.json", time.perf_counter())
    tree = run_tree(cmd, env=dict(os.environ))
    startup = watch.stop()
    rec: dict[str, Any] = {
        "clients": n,
        "returncode": tree.returncode,
        "wall_s": tree.wall_s,
        "startup_s": startup,
        "peak_rss_mb": tree.peak_rss_mb,
        "peak_pss_mb": tree.peak_pss_mb,
        "peak_processes": tree.peak_processes,
        "cpu_s": tree.cpu_s,
        "load_before": load_before,
        "load_after": os.getloadavg(),
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
            "teardown_s": tree.wall_s - (startup or 0.0) - sum(seconds),
            "trained_per_round": [sum(c["status"] == "trained" for c in r["clients"].values()) for r in raw["rounds"]],
            "examples_per_round": [sum(c.get("examples") or 0 for c in r["clients"].values()) for r in raw["rounds"]],
            "metrics_json_bytes": metrics.stat().st_size,
        }
    )
    return rec


# ----------------------------------------------------------------------------------------- driver sampling


def _sampled_driver(profile: Path, flags: list[str]) -> None:
    """Run ``fedllm`` in this process while a thread samples every other thread's stack every 20 ms."""
    counts: dict[str, collections.Counter[str]] = {"startup": collections.Counter(), "rounds": collections.Counter()}
    samples = collections.Counter[str]()
    out_dir = Path(flags[flags.index("--out") + 1]) if "--out" in flags else None
    stop = threading.Event()

    def sample() -> None:
        me = threading.get_ident()
        while not stop.is_set():
            phase = "rounds" if out_dir is not None and (out_dir / "metrics.json").exists() else "startup"
            samples[phase] += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                seen: set[str] = set()
                f = frame
                while f is not None:
                    code = f.f_code
                    seen.add(f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}")
                    f = f.f_back
                counts[phase].update(seen)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    sys.argv = ["fedllm", *flags]
    try:
        runpy.run_module("fedllm", run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    finally:
        stop.set()
        thread.join(timeout=1)
        lines = []
        for phase, counter in counts.items():
            total = max(samples[phase], 1)
            lines.append(f"== {phase}: {samples[phase]} samples of 20 ms (inclusive share of samples, all threads)")
            for name, c in counter.most_common(60):
                lines.append(f"{c / total:7.1%}  {name}")
        profile.write_text("\n".join(lines) + "\n")
    sys.exit(code)


# ----------------------------------------------------------------------------------------- report


def _summary(runs: list[dict[str, Any]], sizes: list[int], rounds: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Per-repeat ratios of every size to the smallest (same repeat), and each size's own figures."""
    ok = [r for r in runs if "error" not in r]
    base = sizes[0]
    by_rep: dict[int, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for r in ok:
        by_rep[r["repeat"]][r["clients"]] = r
    rows: list[list[str]] = []
    ratios: dict[str, Any] = {}
    for n in sizes[1:]:
        pairs = [(reps[base], reps[n]) for reps in by_rep.values() if base in reps and n in reps]
        if not pairs:
            continue
        later = spread([b["later_round_median_s"] / a["later_round_median_s"] for a, b in pairs])
        allr = spread([statistics.mean(b["round_seconds"]) / statistics.mean(a["round_seconds"]) for a, b in pairs])
        start = spread([b["startup_s"] / a["startup_s"] for a, b in pairs if a["startup_s"] and b["startup_s"]])
        ratios[str(n)] = {"later_rounds": later, "all_rounds": allr, "startup": start}
        target = "<= 1.2x" if n == sizes[-1] else ""
        rows += [
            [f"s/round (rounds 2..{rounds}), {n} / {base} clients", fmt(later), target],
            [f"s/round (all rounds, mean), {n} / {base} clients", fmt(allr), ""],
            [f"start-up, {n} / {base} clients", fmt(start), ""],
        ]
    for n in sizes:
        mine = [r for r in ok if r["clients"] == n]
        if not mine:
            continue
        later = spread([r["later_round_median_s"] for r in mine])
        rows.append([f"{n} clients: later round s", fmt(later, 2, " s"), ""])
        rows.append([f"{n} clients: first round s", fmt(spread([r["first_round_s"] for r in mine]), 2, " s"), ""])
        starts = [r["startup_s"] for r in mine if r["startup_s"]]
        if starts:
            rows.append([f"{n} clients: start-up (launch to round 1) s", fmt(spread(starts), 1, " s"), ""])
        rows.append([f"{n} clients: teardown s", fmt(spread([r["teardown_s"] for r in mine]), 1, " s"), ""])
        rss, pss = (max(r[k] for r in mine) / GB for k in ("peak_rss_mb", "peak_pss_mb"))
        rows.append([f"{n} clients: peak tree RSS / PSS", f"{rss:.2f} / {pss:.2f} GiB", "<= 6 GB"])
    rows.append(["runs completed", f"{len(ok)} of {len(runs)}", "all"])
    return rows, ratios


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--sampled-driver":
        quiet_env()
        _sampled_driver(Path(sys.argv[2]), sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rows-per-client", type=int, default=3, help="training + local test rows per client")
    parser.add_argument("--sample-driver", action="store_true", help="sample the driver's stacks (largest size)")
    parser.add_argument("--name", default="scale", help="results file: benchmarks/results/<name>.json")
    parser.add_argument("extra", nargs="*", help="more `fedllm simulate` flags, after --")
    args = parser.parse_args()
    quiet_env()
    sizes = sorted(args.sizes)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedllm-scale-") as tmp:
        data = Path(tmp) / "keywords.jsonl"
        write_data(data, args.rows_per_client * sizes[-1] + CENTRAL_TEST)
        files = {n: scenario_file(n, data, args.rows_per_client * n, Path(tmp)) for n in sizes}
        for rep in range(args.repeats):
            for n in sizes:
                sampled = args.sample_driver and n == sizes[-1] and not rep
                profile = RESULTS / f"{args.name}_profile_{n}.txt" if sampled else None
                RESULTS.mkdir(parents=True, exist_ok=True)
                rec = one_run(n, args, Path(tmp) / f"n{n}-r{rep}", files[n], profile)
                rec["repeat"] = rep
                runs.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "error"}), flush=True)
                if "error" in rec:
                    print(rec["error"], file=sys.stderr)
    rows, ratios = _summary(runs, sizes, args.rounds)
    out: dict[str, Any] = {"sizes": sizes, "rounds": args.rounds, "per_round": args.per_round, "runs": runs}
    out.update({"rows_per_client": args.rows_per_client, "ratios_to_smallest": ratios, "extra_flags": args.extra})
    print(table(["what", "median [min-max]", "target"], rows))
    print(f"\nwrote {write(args.name, out)}")
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
