"""``fedllm compare RUN...``: accuracy against epsilon over runs of one scenario (``fedllm.report.curve``).

Prints the table (final central accuracy, the largest and smallest final client epsilon; a non-private run
has epsilon infinity); ``--svg`` writes the curve as a standalone SVG, ``--json`` the points.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("compare", help="accuracy vs epsilon over several runs of one scenario")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--svg", type=Path, help="write the accuracy-vs-epsilon curve here")
    parser.add_argument("--json", type=Path, help="write the points here")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedllm.files import atomic_write_json, atomic_write_text
    from fedllm.report.curve import compare, point_facts, render_table
    from fedllm.report.svg import curve_chart

    points = compare(args.runs)
    print(render_table(points))
    facts = [point_facts(p) for p in points]
    if args.svg:
        atomic_write_text(args.svg, curve_chart(facts, standalone=True) + "\n")
        print(args.svg)
    if args.json:
        atomic_write_json(args.json, facts)
        print(args.json)
    return 0
