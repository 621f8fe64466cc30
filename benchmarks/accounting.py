"""How long a client waits for its own accounting: epsilon after 1,000 rounds, and noise calibration.

Target: a client's epsilon after 1,000 rounds, and noise calibration for a 1,000-round schedule, each in
<= 1 s. Every evaluation here is cold (the accountant's result cache is cleared first, and calibration
bypasses the disk cache except in the row that measures it), because the first call is the one a client
pays for. Accountants: ``pld`` (dp-accounting PLD, pessimistic, adaptive interval), ``prv``, ``rdp``.

Three views of "epsilon after 1,000 rounds":

* ``merged``: the real case inside one run. A client's mechanism is the same every round (noise is
  calibrated once for the whole schedule), so ``history_of`` merges 1,000 rounds into one
  ``(sigma, q, 1000 * steps)`` entry.
* ``client path``: what ``ClientBudget`` does at the start of round 1,001 -- read 1,000 rounds from the
  client's SQLite ledger, then ``decide`` (spent and projected epsilon).
* ``distinct``: a history whose consecutive entries differ (e.g. a ledger shared by many runs with
  different schedules). Opacus' accountants then pay per entry; we measure the growth on small sizes
  and extrapolate instead of running 1,000 PRV entries, which exhausted memory here. ``pld`` groups the
  history by (sigma, q), so it pays per distinct mechanism.

Usage: ``python -m benchmarks.accounting [--repeats 5] [--rounds 1000] [--local-steps 20]``
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks._common import fmt, quiet_env, spread, table, write

DELTA = 1e-5
EXAMPLES, BATCH = 2000, 32


def _cold_epsilon(kind: str, history: list[tuple[float, float, int]]) -> tuple[float, float]:
    from fedllm.accounting import _epsilon_cached, epsilon_of

    _epsilon_cached.cache_clear()
    start = time.perf_counter()
    eps = epsilon_of(kind, history, DELTA)
    return time.perf_counter() - start, eps


def _client_path(kind: str, rounds: int, steps: int, sigma: float, q: float) -> tuple[float, float, float]:
    """(seconds to read the ledger + decide, seconds to fill the ledger, epsilon spent)."""
    from fedllm.accounting import Mechanism, _epsilon_cached
    from fedllm.budget import ClientBudget
    from fedllm.config import PrivacyConfig
    from fedllm.ledger import Ledger, make_entry

    mech = Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0)
    privacy = PrivacyConfig(epsilon=1e9, delta=DELTA, accountant=kind)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.sqlite"
        fill = time.perf_counter()
        with Ledger(path) as ledger:
            for r in range(rounds):
                ledger.append(
                    make_entry(
                        run_id="bench",
                        round=r + 1,
                        client_id="c",
                        status="reserved",
                        mechanism=mech,
                        delta=DELTA,
                        accountant=kind,
                        epsilon=0.0,
                        budget_epsilon=1e9,
                    )
                )
        fill = time.perf_counter() - fill
        _epsilon_cached.cache_clear()
        start = time.perf_counter()
        with Ledger(path) as ledger:
            budget = ClientBudget(ledger, "c", privacy, {})
            decision = budget.decide(mech)
        return time.perf_counter() - start, fill, decision.spent_epsilon


def _calibrate(kind: str, q: float, total_steps: int, target: float) -> tuple[float, float]:
    from fedllm.accounting import _epsilon_cached, calibrate_noise

    _epsilon_cached.cache_clear()  # calibration evaluates epsilon_of: a warm cache would hide its cost
    start = time.perf_counter()
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, total_steps=total_steps, accountant=kind)
    return time.perf_counter() - start, sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--kinds", nargs="+", default=["pld", "prv", "rdp"], choices=["pld", "prv", "rdp"])
    parser.add_argument("--name", default="accounting", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    quiet_env()
    warnings.filterwarnings("ignore")
    from fedllm.budget import planned_sample_rate

    q = planned_sample_rate(EXAMPLES, BATCH)
    sigma = 1.0
    total = args.rounds * args.local_steps
    rows, out = [], {"rounds": args.rounds, "local_steps": args.local_steps, "sample_rate": q, "delta": DELTA}

    kinds = tuple(args.kinds)
    for kind in kinds:
        merged = [(sigma, q, total)]
        times, eps = [], 0.0
        for _ in range(args.repeats):
            dt, eps = _cold_epsilon(kind, merged)
            times.append(dt)
        s = spread(times)
        out[f"epsilon_merged_{kind}"] = {"seconds": s, "epsilon": eps}
        rows.append([f"epsilon after {args.rounds} rounds ({kind}, merged history)", fmt(s, 3, " s"), f"eps={eps:.3f}"])

        path_times, fill, spent = [], 0.0, 0.0
        for _ in range(max(1, args.repeats // 2)):
            dt, fill, spent = _client_path(kind, args.rounds, args.local_steps, sigma, q)
            path_times.append(dt)
        s = spread(path_times)
        out[f"client_path_{kind}"] = {"seconds": s, "epsilon": spent, "ledger_fill_seconds": fill}
        rows.append(
            [f"ClientBudget: read {args.rounds}-row ledger + decide ({kind})", fmt(s, 3, " s"), f"eps={spent:.3f}"]
        )

    # Distinct consecutive entries (alternating sigma): cost grows with the number of entries.
    growth: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    sizes_of = {"pld": (1, 100, 1000), "prv": (1, 10, 30), "rdp": (1, 100, 1000)}
    for kind, sizes in ((k, sizes_of[k]) for k in kinds):
        for n in sizes:
            hist = [(sigma + 0.001 * (i % 2), q, args.local_steps) for i in range(n)]
            dt, eps = _cold_epsilon(kind, hist)
            growth[kind].append({"entries": n, "seconds": dt, "epsilon": eps})
            rows.append([f"epsilon, {n} distinct entries ({kind})", f"{dt:.3f} s", f"eps={eps:.3f}"])
    out["distinct_entries"] = growth
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    for kind in kinds:
        for label, steps in (
            ("hospitals schedule, 3 x 20 steps", 3 * 20),
            (f"{args.rounds} x {args.local_steps} steps", total),
        ):
            times, sig = [], 0.0
            for _ in range(max(1, args.repeats // 2)):
                dt, sig = _calibrate(kind, q, steps, 8.0)
                times.append(dt)
            s = spread(times)
            out[f"calibrate_{kind}_{steps}"] = {"seconds": s, "sigma": sig}
            rows.append([f"calibrate_noise eps=8 ({kind}, {label})", fmt(s, 3, " s"), f"sigma={sig:.3f}"])

    if "pld" in kinds:
        rows += _pld_extras(out, q, total, args)
    print(table(["what", "time median [min-max]", "value"], rows))
    print(f"\nwrote {write(args.name, out)}")


def _pld_extras(out: dict, q: float, total: int, args: argparse.Namespace) -> list[list[str]]:
    """A second process' calibration (the disk cache: budget._calibrated's path), and pld against the fine
    reference over the calibrated schedule (it must be >= the reference and <= 1 % above)."""
    from fedllm.accounting import Mechanism, cached_calibration, dp_accounting_epsilon, epsilon_of

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDLLM_CACHE"] = tmp
        kwargs = {"target_epsilon": 8.0, "delta": DELTA, "sample_rate": q, "total_steps": total, "accountant": "pld"}
        cached_calibration(**kwargs)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            cached_calibration(**kwargs)
            times.append(time.perf_counter() - start)
        s = spread(times)
        out["calibration_disk_cache_hit"] = {"seconds": s}
        rows.append([f"calibrate (pld, {args.rounds} x {args.local_steps}), disk cache hit", fmt(s, 4, " s"), ""])
    sig = out[f"calibrate_pld_{total}"]["sigma"]
    ours = epsilon_of("pld", [(sig, q, total)], DELTA)
    reference = dp_accounting_epsilon([Mechanism(sig, q, total, 1.0)], DELTA)
    out["pld_vs_reference"] = {"pld": ours, "reference_1e-4": reference, "relative": ours / reference - 1}
    rows.append(["pld vs dp-accounting PLD at 1e-4 (calibrated schedule)", "", f"{ours / reference - 1:+.3%}"])
    return rows


if __name__ == "__main__":
    main()
