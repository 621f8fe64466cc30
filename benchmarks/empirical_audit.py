"""Theoretical epsilon against the one-run empirical lower bound, with and without DP, on a real scenario.

For the default scenario (hospitals: MiniLM with LoRA on MedMCQA) one client gets ``--canaries``
random-label canaries, each by a secret fair coin (``fedllm/audit/canaries.py``); the run trains, the black-box
adversary guesses ``--guesses`` of them from the final global model, and the guesses become a 95 % lower
bound on epsilon. The same run is repeated without DP, which shows what the attack finds when nothing
protects the canaries. Each run goes through ``fedllm.simulation.simulate``, exactly as ``fedllm simulate``
would run the scenario with an ``[empirical_audit]`` table.

The full scenario is slow on a small CPU, so the default is a reduced version (``--max-examples``,
``--rounds``, ``--local-steps``); the table and the JSON say which settings ran. ``--full`` runs the
scenario's own data size, rounds and steps.

Usage: ``python -m benchmarks.empirical_audit [--scenario hospitals] [--client st-marys] [--canaries 200]
[--guesses 40] [--max-examples 600] [--rounds 2] [--local-steps 40] [--full] [--out DIR]``
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._common import quiet_env, table, write


def _overrides(args: argparse.Namespace, dp: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "privacy.enabled": dp,
        "empirical_audit.enabled": True,
        "empirical_audit.canaries": args.canaries,
        "empirical_audit.guesses": args.guesses,
    }
    if args.client:
        out["empirical_audit.client"] = args.client
    if not args.full:
        out.update(
            {"data.max_examples": args.max_examples, "rounds": args.rounds, "training.local_steps": args.local_steps}
        )
    return out


def run_one(args: argparse.Namespace, dp: bool, out_dir: Path) -> dict[str, Any]:
    """One audited run; returns the result row (the run directory keeps everything else)."""
    from fedllm.audit.empirical_result import load_result
    from fedllm.config import load_config
    from fedllm.run import lifecycle
    from fedllm.run.spec import RunSpec

    cfg, _ = load_config(args.scenario, _overrides(args, dp))
    started = time.monotonic()
    lifecycle.simulate(RunSpec(config=cfg, out_dir=out_dir.resolve()))
    result = load_result(out_dir)
    if result is None:
        raise SystemExit(f"{out_dir}: the run completed no round; no empirical result")
    return {
        **result.to_dict(),
        "wall_seconds": round(time.monotonic() - started, 1),
        "settings": {
            "model": f"{cfg.model.name} ({cfg.model.mode})",
            "rounds": cfg.rounds,
            "local_steps": cfg.training.local_steps,
            "max_examples": cfg.data.max_examples,
            "budget_epsilon": cfg.client_settings(result.client).epsilon if dp else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="hospitals")
    parser.add_argument("--client", help="the audited client (default: the scenario's first)")
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--guesses", type=int, default=40)
    parser.add_argument("--max-examples", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--full", action="store_true", help="the scenario as it is (slow on CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    parser.add_argument("--out", type=Path, help="where the runs go (default runs/empirical-audit-<time>)")
    args = parser.parse_args(argv)
    quiet_env()
    root = args.out or Path("runs") / f"empirical-audit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for dp in (True, False)[: 1 if args.no_baseline else 2]:
        rows.append({"dp": dp, **run_one(args, dp, root / ("dp" if dp else "no-dp"))})
    headers = ["DP", "client", "theoretical ε", "empirical lower bound (95%)", "m", "k (in/out)", "correct", "wall s"]
    body = [
        [
            "on" if r["dp"] else "off",
            r["client"],
            "∞" if r["theoretical_epsilon"] is None else f"{r['theoretical_epsilon']:.3f}",
            f"{r['lower_bound']:.3f}" + (" VIOLATION" if r["violation"] else ""),
            r["canaries"],
            f"{r['guesses']} ({r['guesses_in']}/{r['guesses_out']})",
            r["correct"],
            r["wall_seconds"],
        ]
        for r in rows
    ]
    print(f"{args.scenario}{'' if args.full else ' (reduced)'}: {rows[0]['settings']}")
    print(table(headers, body))
    path = write(
        "empirical_audit",
        {"scenario": args.scenario, "reduced": not args.full, "runs": rows, "out": str(root)},
    )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
