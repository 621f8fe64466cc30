"""``fedllm report DIR``: a run's report, or, for a folder of runs, each run's report and their comparison."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write report.html / report.md / report.json for a run (or for a folder of runs: each run's, and"
        " their accuracy-vs-epsilon comparison)",
    )
    parser.add_argument("dir", type=Path, help="the run directory, or a folder whose sub-folders are runs")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedllm.report.write import write_any  # the audit engine loads only when a report is written

    for paths in write_any(args.dir):
        for path in paths.values():
            print(path)
    return 0
