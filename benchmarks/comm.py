"""Communication: bytes each client uploads per round, LoRA vs full fine-tuning, with and without SecAgg+.

Measured from the messages themselves: a mod placed outside fedllm's own client mods serializes every
training reply with Flower's serde (``recorddict_to_proto(reply.content).ByteSize()``, the protobuf a
SuperNode sends to the SuperLink) and logs it with its SecAgg+ stage. Under SecAgg+ a client answers
four training messages per round (setup: public keys; share keys: encrypted key shares for its peers;
collect masked vectors: the masked update as int64; unmask: shares for survivors/dropouts); plain FedAvg
answers one. Requests (the global model going down) are logged too. Bytes do not depend on training, so
each run is one round of one local step on the default scenario (3 hospitals, MiniLM).

Target: LoRA upload <= 0.5% of full fine-tuning's.

Usage: ``python -m benchmarks.comm [--modes lora full] [--scenario hospitals]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks._common import quiet_env, table, write

REPO = Path(__file__).resolve().parent.parent


def _measuring_mod_factory(original, log_path: str):
    """Wrap fedllm's client mod so that the reply it produces (masked, if SecAgg+) is what gets measured."""

    def factory(required):
        inner = original(required)

        def mod(msg, ctxt, call_next):
            from flwr.app.message_type import MessageType
            from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
            from flwr.common.serde import recorddict_to_proto

            # Read the request before the inner mods run: secaggplus_mod consumes its config record.
            records = msg.content.config_records
            secagg = records[RECORD_KEY_CONFIGS] if RECORD_KEY_CONFIGS in records else {}
            stage = str(secagg[Key.STAGE]) if Key.STAGE in secagg else "plain"
            down = recorddict_to_proto(msg.content).ByteSize()
            reply = inner(msg, ctxt, call_next)
            if msg.metadata.message_type == MessageType.TRAIN:
                entry = {
                    "node": int(msg.metadata.dst_node_id),
                    "round": str(msg.metadata.group_id),
                    "stage": stage,
                    "up": recorddict_to_proto(reply.content).ByteSize() if reply.has_content() else 0,
                    "down": down,
                }
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            return reply

        return mod

    return factory


def measure(scenario: str, mode: str, secagg: bool, tmp: Path) -> dict[str, Any]:
    import fedllm.apps.client as client_apps
    from fedllm.config import load_config
    from fedllm.model import build_model, count_parameters
    from fedllm.run import lifecycle
    from fedllm.run.spec import RunSpec

    overrides = {
        "rounds": 1,
        "training.local_steps": 1,
        "model.mode": mode,
        "secure_aggregation.enabled": secagg,
    }
    cfg, _ = load_config(scenario, overrides)
    trainable, total = count_parameters(build_model(cfg.model, 20))
    log_path = tmp / f"{mode}-{secagg}.jsonl"
    original = client_apps.secagg_mod
    client_apps.secagg_mod = _measuring_mod_factory(original, str(log_path))
    try:
        lifecycle.simulate(RunSpec(config=cfg, out_dir=tmp / f"run-{mode}-{secagg}"))
    finally:
        client_apps.secagg_mod = original
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    per_client: dict[tuple[int, str], int] = defaultdict(int)
    down: dict[tuple[int, str], int] = defaultdict(int)
    stages: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        per_client[(e["node"], e["round"])] += e["up"]
        down[(e["node"], e["round"])] += e["down"]
        stages[e["stage"]].append(e["up"])
    ups = list(per_client.values())
    return {
        "mode": mode,
        "secagg": secagg,
        "trainable_params": trainable,
        "total_params": total,
        "fp32_bytes": 4 * trainable,
        "upload_per_client_round": {"max": max(ups), "min": min(ups), "n": len(ups)},
        "download_per_client_round": max(down.values()),
        "upload_by_stage_max": {k: max(v) for k, v in stages.items()},
        "messages_per_client_round": len(entries) / max(1, len(per_client)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="hospitals")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"])
    args = parser.parse_args()
    quiet_env()
    # Ray workers import the measuring mod by module name: make the repository importable for them.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    import warnings

    warnings.filterwarnings("ignore")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedllm-comm-") as tmp:
        for mode in args.modes:
            for secagg in (False, True):
                res = measure(args.scenario, mode, secagg, Path(tmp))
                results.append(res)
                print(json.dumps(res), flush=True)
    rows = []
    by = {(r["mode"], r["secagg"]): r for r in results}
    for r in results:
        full = by.get(("full", r["secagg"]))
        share = (
            f"{100 * r['upload_per_client_round']['max'] / full['upload_per_client_round']['max']:.3f}%"
            if full
            else "-"
        )
        stages = ", ".join(f"{k} {v:,}" for k, v in r["upload_by_stage_max"].items())
        rows.append(
            [
                r["mode"],
                "SecAgg+" if r["secagg"] else "plain",
                f"{r['trainable_params']:,}",
                f"{r['fp32_bytes']:,}",
                f"{r['upload_per_client_round']['max']:,}",
                share,
                f"{r['messages_per_client_round']:.0f}",
                stages,
            ]
        )
    headers = ["mode", "aggregation", "trainable", "fp32 bytes", "upload B/client/round", "of full", "msgs", "by stage"]
    print(table(headers, rows))
    ratios = {
        f"lora_over_full_{'secagg' if s else 'plain'}": by[("lora", s)]["upload_per_client_round"]["max"]
        / by[("full", s)]["upload_per_client_round"]["max"]
        for s in (False, True)
        if ("lora", s) in by and ("full", s) in by
    }
    print(json.dumps(ratios))
    print(f"\nwrote {write('comm', {'scenario': args.scenario, 'results': results, 'ratios': ratios})}")


if __name__ == "__main__":
    main()
