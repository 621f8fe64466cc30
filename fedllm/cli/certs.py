"""``fedllm certs``: a consortium's CA, SuperLink certificate and node keys."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedllm.certs import DEFAULT_DAYS, make_consortium


def register(subparsers: Any) -> None:
    """Add ``certs DIR --san ... --node ... [--days N] [--force]`` to the ``fedllm`` command."""
    parser = subparsers.add_parser("certs", help="make a consortium's CA, SuperLink certificate and node keys")
    parser.add_argument("dir", type=Path, help="the consortium's credentials directory")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="a DNS name or IP address the SuperLink is reached by (repeat); makes a new CA and server certificate",
    )
    parser.add_argument(
        "--node", action="append", default=[], metavar="NAME", help="an institution to make a node key for (repeat)"
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    parser.add_argument("--force", action="store_true", help="replace existing keys (old ones stop working)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for line in make_consortium(args.dir, args.san, args.node, days=args.days, force=args.force):
        print(line)
    return 0
