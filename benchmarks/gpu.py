"""GPU: DP-SGD vs non-private step time, throughput and peak memory on CUDA.

Two models: the default scenario's (MiniLM, LoRA, batch 32, length 64: simulations/hospitals.toml) and a
BERT-base-sized random model (12 layers, hidden 768, 110 M parameters), each in LoRA and full fine-tuning
(Opacus hooks for LoRA, book-keeping clipping (``fedllm.clipping``) for full, as fedllm trains them). Like
``dp_overhead``, each case alternates DP and plain calls of ``train_dp`` / ``train_plain`` and reports the
median and range of the per-pair ratios; times are taken after ``torch.cuda.synchronize()``; the per-call
set-up (``steps=0``) is subtracted. Peak memory is ``torch.cuda.max_memory_allocated`` per call.

Placement (first, always): ``fedllm simulate`` of the tiny scenario (random tiny BERT, synthetic data: no
files needed) with ``num_gpus = 0`` in quiet and in verbose mode, and with ``num_gpus = 0.5``; each run's
``metrics.json`` records the device every client trained on. Expected: ``cpu`` for every client whenever
``num_gpus = 0``, whatever the mode, and ``cuda:0`` for every client with ``num_gpus > 0``. Any other result
is printed as FAIL and the script exits 1.

Usage (needs a CUDA device): ``python -m benchmarks.gpu [--steps 10] [--repeats 5] [--batch 32 128]``;
``python -m benchmarks.gpu --quick`` (a few minutes): placement, then one short case (MiniLM if its weights
are in $FEDLLM_SHARED, else the BERT-base-shaped random model; LoRA, batch 32, 5 steps, 2 repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks._common import fmt, quiet_env, spread, table, write

NUM_LABELS = 20


def _bert_base(mode: str):
    import torch
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification

    from fedllm.config import ModelConfig
    from fedllm.model import _apply_mode

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS))  # BERT-base shape, random weights
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return _apply_mode(model, ModelConfig(name="bert-base-random", mode=mode)).train()


def _minilm(mode: str):
    from fedllm.config import ModelConfig
    from fedllm.model import build_model

    return build_model(ModelConfig(name="minilm", mode=mode), NUM_LABELS)


def _timed(model, data, *, dp: bool, mode: str, steps: int, batch: int, device) -> tuple[float, float]:
    """(seconds, peak GB) of one call, synchronised on both ends."""
    import torch

    from benchmarks.dp_overhead import train_steps

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_steps(model, data, dp=dp, mode=mode, steps=steps, batch=batch, device=device)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


PLACEMENTS = (  # (label, num_gpus, extra flags, the device every client must report)
    ("num_gpus 0, quiet", 0.0, ["--quiet"], "cpu"),
    ("num_gpus 0, verbose", 0.0, ["--verbose"], "cpu"),
    ("num_gpus 0.5, quiet", 0.5, ["--quiet"], "cuda:0"),
)


def check_placement() -> tuple[list[list[Any]], list[dict[str, Any]], bool]:
    """Run the tiny scenario under each placement; (table rows, records, all as expected)."""
    fedllm = Path(sys.executable).parent / "fedllm"
    rows, records, ok = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, gpus, flags, expected) in enumerate(PLACEMENTS):
            out = Path(tmp) / f"run{i}"
            cmd = [str(fedllm), "simulate", "tiny", "--rounds", "1", "--num-gpus", str(gpus), "--out", str(out)]
            start = time.perf_counter()
            result = subprocess.run([*cmd, *flags], capture_output=True, text=True, env={**os.environ})
            seconds = time.perf_counter() - start
            devices: dict[str, str] = {}
            if result.returncode == 0:
                for r in json.loads((out / "metrics.json").read_text())["rounds"]:
                    devices.update({cid: c.get("device", "") for cid, c in r["clients"].items()})
            good = result.returncode == 0 and bool(devices) and set(devices.values()) == {expected}
            ok &= good
            records.append(
                {
                    "case": label,
                    "num_gpus": gpus,
                    "expected": expected,
                    "devices": devices,
                    "ok": good,
                    "seconds": seconds,
                    "rc": result.returncode,
                }
            )
            seen = ", ".join(sorted(set(devices.values()))) or f"rc {result.returncode}: {result.stderr[-300:]}"
            rows.append([label, expected, seen, "ok" if good else "FAIL", f"{seconds:.0f} s"])
            print(table(["placement", "expected", "clients trained on", "", "wall"], rows[-1:]), flush=True)
    return rows, records, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"])
    parser.add_argument("--quick", action="store_true", help="placement + one short LoRA case (a few minutes)")
    parser.add_argument("--no-placement", action="store_true", help="skip the simulate placement check")
    args = parser.parse_args()
    quiet_env()
    warnings.filterwarnings("ignore")
    import torch

    from benchmarks.dp_overhead import _data

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device; none is visible")
    placement_rows, placement, placed_ok = check_placement() if not args.no_placement else ([], [], True)
    if args.quick:
        from fedllm.errors import ConfigError
        from fedllm.model import minilm_path

        args.steps, args.repeats, args.batch, args.modes, args.models = 5, 2, [32], ["lora"], ["minilm"]
        try:
            minilm_path()
        except ConfigError:
            args.models = ["bert-base"]
    device = torch.device("cuda")
    rows, cases = [], []
    for name in args.models:
        for mode in args.modes:
            model = (_minilm if name == "minilm" else _bert_base)(mode)
            for batch in args.batch:
                data = _data(batch, args.length, model.config.vocab_size)
                for dp in (True, False):  # warm-up: CUDA context, cuBLAS handles, allocator
                    _timed(model, data, dp=dp, mode=mode, steps=2, batch=batch, device=device)
                setup = {
                    dp: min(
                        _timed(model, data, dp=dp, mode=mode, steps=0, batch=batch, device=device)[0] for _ in range(2)
                    )
                    for dp in (True, False)
                }
                ratios, dp_s, plain_s, mem = [], [], [], {True: 0.0, False: 0.0}
                for _ in range(args.repeats):
                    d, md = _timed(model, data, dp=True, mode=mode, steps=args.steps, batch=batch, device=device)
                    p, mp = _timed(model, data, dp=False, mode=mode, steps=args.steps, batch=batch, device=device)
                    d, p = (d - setup[True]) / args.steps, (p - setup[False]) / args.steps
                    ratios.append(d / p)
                    dp_s.append(d)
                    plain_s.append(p)
                    mem = {True: max(mem[True], md), False: max(mem[False], mp)}
                case: dict[str, Any] = {
                    "model": name,
                    "mode": mode,
                    "batch": batch,
                    "length": args.length,
                    "ratio": spread(ratios),
                    "dp_step_s": spread(dp_s),
                    "plain_step_s": spread(plain_s),
                    "dp_examples_per_s": batch / spread(dp_s)["median"],
                    "plain_examples_per_s": batch / spread(plain_s)["median"],
                    "peak_gb": {"dp": mem[True], "plain": mem[False]},
                }
                cases.append(case)
                rows.append(
                    [
                        name,
                        mode,
                        batch,
                        fmt(case["ratio"]),
                        f"{case['dp_examples_per_s']:.0f} / {case['plain_examples_per_s']:.0f}",
                        f"{mem[True]:.2f} / {mem[False]:.2f}",
                    ]
                )
                print(
                    table(
                        ["model", "mode", "B", "DP/plain step", "examples/s DP / plain", "peak GB DP / plain"],
                        rows[-1:],
                    ),
                    flush=True,
                )
            del model
            torch.cuda.empty_cache()
    print()
    if placement_rows:
        print(table(["placement", "expected", "clients trained on", "", "wall"], placement_rows))
    print(table(["model", "mode", "B", "DP/plain step [min-max]", "examples/s DP / plain", "peak GB DP / plain"], rows))
    record = {"steps": args.steps, "repeats": args.repeats, "length": args.length, "cases": cases}
    print(f"\nwrote {write('gpu', {**record, 'placement': placement})}")
    if not placed_ok:
        raise SystemExit("placement check FAILED: see the table above")


if __name__ == "__main__":
    main()
