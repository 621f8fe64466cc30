"""What every benchmark shares: the machine description, robust ratio statistics and the JSON record.

Timings on a shared machine are noisy, so every figure a benchmark reports is a *ratio* measured inside
one process against its own baseline, with the two sides interleaved (A B A B ...) and repeated; we report
the median and the spread (min..max) of the per-pair ratios rather than a single number.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def quiet_env() -> None:
    """The environment every benchmark runs in: offline, no telemetry, no tokenizer threads."""
    for key, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)


def machine() -> dict[str, Any]:
    """nproc, RAM, CPU model, load and the versions that decide speed: results mean nothing without them."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": ram_gb,
        "cpu": cpu,
        "loadavg_when_written": os.getloadavg(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and range: with few repeats on a shared machine, min/max say more than a standard deviation."""
    vals = list(values)
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def fmt(s: dict[str, float], digits: int = 2, unit: str = "x") -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so the printed output can be pasted into docs/benchmarks.md unchanged."""
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def write(name: str, payload: dict[str, Any]) -> Path:
    """``benchmarks/results/<name>.json`` with the command line and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0])
    invoked = f"python -m benchmarks.{script.stem}" if script.parent == RESULTS.parent else f"python {script}"
    record = {"benchmark": name, "command": " ".join([invoked, *sys.argv[1:]]), "machine": machine()}
    record.update(payload)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
