"""Run a command and watch its whole process tree (Ray's raylet, GCS and workers are all descendants).

CPU time is summed over every process seen, from its last sample: a process loses at most one sampling
interval of CPU time, so the total slightly under-counts short-lived processes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class TreeRun:
    returncode: int
    wall_s: float
    peak_rss_mb: float  # sum of RSS over the tree: counts shared pages once per process (an upper bound)
    peak_pss_mb: float  # sum of PSS: shared pages split between their users (the tree's real share)
    peak_processes: int
    output: str
    cpu_s: float = 0.0  # user + system CPU seconds of every process seen in the tree (last sample of each)


def _sample(pid: int, cpu: dict[tuple[int, float], float]) -> tuple[float, float, int]:
    """Memory of the tree now; updates ``cpu`` ((pid, start time) -> CPU seconds so far) in place."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0, 0
    rss = pss = 0.0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
            t = p.cpu_times()
            cpu[(p.pid, p.create_time())] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss / 2**20, pss / 2**20, len(procs)


def run_tree(cmd: Sequence[str], *, interval: float = 0.5, env: dict[str, str] | None = None) -> TreeRun:
    """Run ``cmd`` to completion, sampling the tree's memory every ``interval`` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0.0, 0.0, 0]
    cpu: dict[tuple[int, float], float] = {}
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout or []), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss, pss, n = _sample(proc.pid, cpu)
        peak = [max(peak[0], rss), max(peak[1], pss), max(peak[2], n)]
        time.sleep(interval)
    wall = time.perf_counter() - start
    reader.join(timeout=5)
    return TreeRun(proc.returncode, wall, peak[0], peak[1], int(peak[2]), "".join(chunks), sum(cpu.values()))
