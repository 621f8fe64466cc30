"""Secure aggregation's cost and exactness: SecAgg+ vs updates in clear, in Flower's simulation engine.

Measures, for N clients (default 5 and 10) on ``tiny-bert`` and the real fedllm client and coordinator:

- round time with and without SecAgg+, as a ratio within one run (runs interleaved, repeated);
- bytes each client uploads per round: every reply a client sends, serialized as Flower sends it
  (protobuf ``Message``), summed over the round's messages (SecAgg+ sends four);
- the masked aggregate's error vs FedAvg in clear, for updates the size of MiniLM's LoRA tensors.

    python benchmarks/secagg.py [--clients 5 10] [--repeats 3] [--rounds 3] [--model tiny-bert|minilm]

Prints a table and writes ``benchmarks/results/secagg-<model>.json``. Timings are ratios within one run: these
machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import message_to_proto

RESULTS = Path(__file__).resolve().parent / "results"
BYTES_ENV = "FEDLLM_BENCH_BYTES_DIR"  # where the measuring mod appends each reply's size


def measure_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: the size of what this node sends back, as Flower serializes it."""
    reply = call_next(msg, ctxt)
    out = Path(os.environ[BYTES_ENV]) / f"node-{ctxt.node_id}.log"
    with out.open("a") as fh:
        fh.write(f"{msg.metadata.group_id} {len(message_to_proto(reply).SerializeToString())}\n")
    return reply


def _run(clients: int, rounds: int, secagg: bool, bytes_dir: Path, model: str) -> dict:
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from fedllm.apps.server import server_app
    from fedllm.client import client_for
    from fedllm.config import load_config
    from fedllm.run import lifecycle
    from fedllm.run.spec import RunSpec
    from fedllm.secure_aggregation import secagg_mod
    from fedllm.simulation import quiet_logs

    cfg, _ = load_config(
        "tiny",
        {
            "num_clients": clients,
            "rounds": rounds,
            "model.name": model,
            "secure_aggregation.enabled": secagg,
            "privacy.planned_rounds": 50,
        },
    )
    out = Path(tempfile.mkdtemp(prefix="secagg-bench-"))
    spec = RunSpec(config=cfg, out_dir=out)
    quiet_logs(False)
    lifecycle.prepare(spec)
    server = server_app(spec)
    mods = [measure_mod, secagg_mod(lambda _: secagg)]
    client = ClientApp(client_fn=lambda ctx: client_for(spec, ctx).to_client(), mods=mods)
    os.environ[BYTES_ENV] = str(bytes_dir)
    started = time.monotonic()
    try:
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"log_to_driver": False},
            },
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    wall = time.monotonic() - started
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = [r["seconds"] for r in metrics["rounds"]]
    return {"wall": wall, "round_seconds": seconds, "steady_round": statistics.median(seconds[1:] or seconds)}


def _bytes_per_client_round(bytes_dir: Path) -> float:
    """Per node and round (group id), the sum of its replies' sizes; the median over all of them."""
    per: dict[tuple[str, str], int] = {}
    for log in bytes_dir.glob("node-*.log"):
        for line in log.read_text().splitlines():
            group, size = line.split()
            per[(log.name, group)] = per.get((log.name, group), 0) + int(size)
    return statistics.median(per.values()) if per else float("nan")


def aggregate_error(clients: int = 5, repeats: int = 20) -> dict:
    """SecAgg+'s arithmetic (Flower's quantize / dequantize with our parameters) on MiniLM-LoRA-sized deltas.

    The end-to-end version over Flower's real workflow is ``tests/unit/test_secure_aggregation.py``; this one
    repeats the arithmetic on a realistic size (81,428 values, as the default scenario's LoRA tensors).
    """
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from fedllm.config import SecureAggregationConfig

    s = SecureAggregationConfig()
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(repeats):
        weights = rng.integers(1000, 3000, clients)
        deltas = [rng.normal(0, 0.03, 81_428) for _ in range(clients)]  # default scenario: norm ~7.6, max ~0.09
        exact = sum(w * d for w, d in zip(weights, deltas, strict=True)) / weights.sum()
        w_max = int(weights.max())
        ratios = [round(w / w_max * s.quantization_range) for w in weights]
        q = sum(
            quantize([d * r / s.quantization_range], s.clipping_range, s.quantization_range)[0].astype(np.int64)
            for d, r in zip(deltas, ratios, strict=True)
        )
        deq = dequantize([q], s.clipping_range, s.quantization_range)[0] - (clients - 1) * s.clipping_range
        masked = deq * s.quantization_range / sum(ratios)
        errors.append(float(np.linalg.norm(masked - exact) / np.linalg.norm(exact)))
    return {
        "clients": clients,
        "values": 81_428,
        "median_relative_error": statistics.median(errors),
        "max": max(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="tiny-bert", help="tiny-bert (default) or minilm: what travels is its LoRA")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict = {"aggregate_error": aggregate_error(), "runs": []}
    for n in args.clients:
        ratios, plain_b, masked_b, rows = [], [], [], []
        for _ in range(args.repeats):
            pair = {}
            for secagg in (False, True):  # interleaved: the machine's load hits both alike
                with tempfile.TemporaryDirectory() as bytes_dir:
                    r = _run(n, args.rounds, secagg, Path(bytes_dir), args.model)
                    r["bytes_per_client_round"] = _bytes_per_client_round(Path(bytes_dir))
                pair[secagg] = r
            ratios.append(pair[True]["steady_round"] / pair[False]["steady_round"])
            plain_b.append(pair[False]["bytes_per_client_round"])
            masked_b.append(pair[True]["bytes_per_client_round"])
            rows.append(pair)
        results["runs"].append(
            {
                "clients": n,
                "round_seconds_plain": statistics.median(p[False]["steady_round"] for p in rows),
                "round_seconds_secagg": statistics.median(p[True]["steady_round"] for p in rows),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "bytes_per_client_round_plain": statistics.median(plain_b),
                "bytes_per_client_round_secagg": statistics.median(masked_b),
                "raw": rows,
            }
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    results["model"] = args.model
    (RESULTS / f"secagg-{args.model}.json").write_text(json.dumps(results, indent=2))
    e = results["aggregate_error"]
    print(f"masked vs FedAvg, {e['clients']} clients x {e['values']} values: median {e['median_relative_error']:.2e}")
    print("clients | round s plain | round s SecAgg+ | ratio (min-max) | bytes/client/round plain | SecAgg+")
    for r in results["runs"]:
        print(
            f"{r['clients']:7d} | {r['round_seconds_plain']:13.2f} | {r['round_seconds_secagg']:15.2f} | "
            f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
            f"{r['bytes_per_client_round_plain']:24,.0f} | {r['bytes_per_client_round_secagg']:,.0f}"
        )


if __name__ == "__main__":
    main()
