"""DP-SGD overhead per training step: fedllm's ``train_dp`` against its own non-private ``train_plain``.

Same model object, same trainable set, same optimizer, same (expected) batch size and sequence length.
Targets: LoRA <= 1.10x, full fine-tuning <= 1.5x. Both trainers are called as the client calls them (one
call = one round of ``steps`` steps), interleaved DP / plain / DP / plain, so load from other processes
hits both sides alike. The headline is the ratio of *CPU time* (``time.process_time``, with one torch
thread, ``--threads 1``), which other processes on a shared machine barely disturb; the wall-time ratio is
reported beside it. Per-step time excludes each call's fixed set-up, which is measured on its own
(``steps=0``: Opacus wraps the model, optimizer and loader every round) and reported as ``setup``.

Data: random token ids of exactly ``L`` tokens, so per-batch padding pads nothing and the length is the
one asked for. DP batches are Poisson with expected size ``B``; plain batches are exactly ``B``. Over the few
steps of a measurement the DP batches average 0.8-1.2 ``B``, so the CPU ratio is also given per example
trained on (``per example``), which removes that sampling noise (a step's cost is close to linear in B).

Peak memory (``--memory``, Linux): each (mode, B, L, dp) case runs in a fresh subprocess whose peak-RSS
mark is reset after the model is built; we report the ratio of the peak RSS during training and of its
growth over the RSS before training (the training working set: activations, per-sample gradients).

Per-example clipping: each mode uses ``fedllm.training.GRAD_SAMPLE_MODE`` (full fine-tuning: book-keeping,
``fedllm/clipping.py``); ``--grad-mode full=ghost`` measures another (Opacus' ghost clipping, the previous
default) in the same conditions.

Usage: ``python -m benchmarks.dp_overhead [--modes lora full] [--batch 16 32] [--length 64 128]
[--steps 4] [--repeats 3] [--memory] [--model minilm] [--threads 1] [--grad-mode full=ghost]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from typing import Any

from benchmarks._common import fmt, quiet_env, spread, table, write

TARGET = {"lora": 1.10, "full": 1.50, "last-layers": 1.5}
NUM_LABELS = 4


def _data(batch: int, length: int, vocab: int, batches: int = 8):
    """A TokenizedDataset of ``batches * batch`` rows of exactly ``length`` random ids (no tokenizer)."""
    import torch

    from fedllm.training import TokenizedDataset

    gen = torch.Generator().manual_seed(0)
    data = TokenizedDataset.__new__(TokenizedDataset)
    n = batches * batch
    data.input_ids = [torch.randint(1000, vocab, (length,), generator=gen) for _ in range(n)]
    data.labels = torch.randint(0, NUM_LABELS, (n,), generator=gen)
    data.pad_id = 0
    return data


def set_grad_modes(specs: list[str]) -> None:
    """``MODE=GRAD_SAMPLE_MODE`` pairs override fedllm.training's choice for this process."""
    from fedllm import training

    for spec in specs:
        mode, _, grad_mode = spec.partition("=")
        if mode not in training.GRAD_SAMPLE_MODE or not grad_mode:
            raise SystemExit(
                f"--grad-mode {spec!r}: expected MODE=GRAD_SAMPLE_MODE, MODE in {list(training.GRAD_SAMPLE_MODE)}"
            )
        training.GRAD_SAMPLE_MODE[mode] = grad_mode


def _model(name: str, mode: str):
    from fedllm.config import ModelConfig
    from fedllm.model import build_model

    return build_model(ModelConfig(name=name, mode=mode), NUM_LABELS)


def train_steps(model, data, *, dp: bool, mode: str, steps: int, batch: int, device) -> int:
    """The measured work: ``steps`` local steps, DP-SGD (sigma 1, clip 1) or plain, same data and batch.
    Returns the examples trained on (Poisson batches vary around ``batch``)."""
    from fedllm.accounting import make_accountant
    from fedllm.training import DPSettings, train_dp, train_plain

    if dp:
        result = train_dp(
            model,
            data,
            steps=steps,
            batch_size=batch,
            learning_rate=1e-4,
            dp=DPSettings(1.0, 1.0, mode),
            accountant=make_accountant("prv"),
            device=device,
        )
    else:
        result = train_plain(model, data, steps=steps, batch_size=batch, learning_rate=1e-4, device=device)
    return result.examples_seen


def _run(model, data, *, dp: bool, mode: str, steps: int, batch: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, examples). With one torch thread, CPU time is what the step
    costs even while other processes take the cores; wall time is what a user waits."""
    import torch

    start, cpu = time.perf_counter(), time.process_time()
    seen = train_steps(model, data, dp=dp, mode=mode, steps=steps, batch=batch, device=torch.device("cpu"))
    return time.perf_counter() - start, time.process_time() - cpu, seen


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child_memory(name: str, mode: str, batch: int, length: int, dp: bool, steps: int) -> dict[str, float]:
    """One case in a fresh process: peak RSS during training only, and its growth over the RSS before it.

    Loading the checkpoint peaks higher than a LoRA step does, so the kernel's high-water mark is reset
    (``/proc/self/clear_refs``) once the model and data are built: the peak is then training's own.
    """
    import gc

    model = _model(name, mode)
    data = _data(batch, length, model.config.vocab_size)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    _run(model, data, dp=dp, mode=mode, steps=steps, batch=batch)
    peak = _status_mb("VmHWM")
    return {"rss_before_mb": before, "peak_rss_mb": peak, "growth_mb": peak - before}


def _memory_case(args: argparse.Namespace, mode: str, batch: int, length: int, dp: bool) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.dp_overhead", "--child", json.dumps([mode, batch, length, dp])]
    cmd += ["--model", args.model, "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += [f"--grad-mode={spec}" for spec in args.grad_mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"])
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--length", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also peak RSS per case, one subprocess each")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a busy machine"
    )
    parser.add_argument(
        "--grad-mode",
        action="append",
        default=[],
        metavar="MODE=GRAD_SAMPLE_MODE",
        help="per-example clipping to use for a mode, e.g. full=ghost (default: fedllm.training's choice)",
    )
    parser.add_argument("--name", default="dp_overhead", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_env()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    set_grad_modes(args.grad_mode)
    if args.child:
        mode, batch, length, dp = json.loads(args.child)
        print(json.dumps(child_memory(args.model, mode, batch, length, dp, args.steps)))
        return

    from fedllm.training import GRAD_SAMPLE_MODE

    results: list[dict[str, Any]] = []
    rows = []
    for mode in args.modes:
        model = _model(args.model, mode)
        vocab = model.config.vocab_size
        for batch in args.batch:
            for length in args.length:
                data = _data(batch, length, vocab)
                _run(model, data, dp=True, mode=mode, steps=1, batch=batch)  # warm-up: allocator, hooks, caches
                _run(model, data, dp=False, mode=mode, steps=1, batch=batch)
                setup_dp = [_run(model, data, dp=True, mode=mode, steps=0, batch=batch) for _ in range(2)]
                setup_plain = [_run(model, data, dp=False, mode=mode, steps=0, batch=batch) for _ in range(2)]
                s_dp = [min(x[k] for x in setup_dp) for k in (0, 1)]
                s_plain = [min(x[k] for x in setup_plain) for k in (0, 1)]
                ratios, cpu_ratios, dp_step, plain_step, per_example, dp_rows = [], [], [], [], [], []
                for _ in range(args.repeats):
                    d = _run(model, data, dp=True, mode=mode, steps=args.steps, batch=batch)
                    p = _run(model, data, dp=False, mode=mode, steps=args.steps, batch=batch)
                    t_dp, t_plain = d[0] - s_dp[0], p[0] - s_plain[0]
                    dp_step.append(t_dp / args.steps)
                    plain_step.append(t_plain / args.steps)
                    ratios.append(t_dp / t_plain)
                    cpu_ratios.append((d[1] - s_dp[1]) / (p[1] - s_plain[1]))
                    # A Poisson batch of expected size B is 0.8-1.2 B over a few steps: per example, that
                    # sampling noise leaves the ratio (step cost is close to linear in the batch).
                    per_example.append(((d[1] - s_dp[1]) / max(1, d[2])) / ((p[1] - s_plain[1]) / max(1, p[2])))
                    dp_rows.append(d[2] / max(1, args.steps))
                case: dict[str, Any] = {
                    "mode": mode,
                    "grad_sample_mode": GRAD_SAMPLE_MODE[mode],
                    "batch": batch,
                    "length": length,
                    "ratio": spread(ratios),
                    "cpu_ratio": spread(cpu_ratios),
                    "cpu_ratio_per_example": spread(per_example),
                    "dp_batch": spread(dp_rows),
                    "dp_step_s": spread(dp_step),
                    "plain_step_s": spread(plain_step),
                    "setup_dp_s": s_dp[0],
                    "setup_plain_s": s_plain[0],
                    "target": TARGET.get(mode),
                }
                mem = "-"
                if args.memory:
                    m_dp = _memory_case(args, mode, batch, length, True)
                    m_plain = _memory_case(args, mode, batch, length, False)
                    case["memory"] = {
                        "dp": m_dp,
                        "plain": m_plain,
                        "peak_ratio": m_dp["peak_rss_mb"] / m_plain["peak_rss_mb"],
                        "growth_ratio": m_dp["growth_mb"] / max(1.0, m_plain["growth_mb"]),
                    }
                    mem = (
                        f"{case['memory']['peak_ratio']:.2f}x ({m_dp['peak_rss_mb']:.0f}/{m_plain['peak_rss_mb']:.0f}"
                        f" MB; growth {case['memory']['growth_ratio']:.2f}x)"
                    )
                results.append(case)
                verdict = "met" if case["cpu_ratio"]["median"] <= TARGET.get(mode, 9) else "MISSED"
                rows.append(
                    [
                        f"{mode} ({GRAD_SAMPLE_MODE[mode]})",
                        batch,
                        length,
                        fmt(case["cpu_ratio"]),
                        fmt(case["cpu_ratio_per_example"]),
                        fmt(case["ratio"]),
                        f"{case['dp_step_s']['median']:.3f} / {case['plain_step_s']['median']:.3f}",
                        f"{case['setup_dp_s']:.3f}",
                        mem,
                        f"<= {TARGET.get(mode)} {verdict}",
                    ]
                )
                print(
                    table(
                        [
                            "mode",
                            "B",
                            "L",
                            "CPU DP/plain",
                            "per example",
                            "wall DP/plain",
                            "s/step DP / plain",
                            "DP setup s",
                            "peak RSS",
                            "target",
                        ],
                        rows[-1:],
                    ),
                    flush=True,
                )
    print()
    print(
        table(
            [
                "mode",
                "B",
                "L",
                "CPU-time DP/plain [min-max]",
                "CPU-time per example",
                "wall DP/plain [min-max]",
                "wall s/step DP / plain",
                "DP setup s",
                "peak RSS DP/plain",
                "target",
            ],
            rows,
        )
    )
    payload = {"model": args.model, "steps": args.steps, "repeats": args.repeats, "cases": results}
    print(f"\nwrote {write(args.name, payload)}")


if __name__ == "__main__":
    main()
