"""``fedllm export``: a run's final model as a Hugging Face model directory, with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's final model as a Hugging Face model directory (with a model card)"
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty directory")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--merged", dest="kind", action="store_const", const="merged", help="full weights (default)")
    kind.add_argument("--adapter", dest="kind", action="store_const", const="adapter", help="a PEFT adapter (LoRA)")
    parser.set_defaults(handler=run, kind="merged")


def run(args: argparse.Namespace) -> int:
    from fedllm.export import export  # torch and transformers: only for this command

    out = export(args.run_dir, args.out, args.kind)
    print(f"exported {args.kind} model of {args.run_dir} to {out}")
    return 0
