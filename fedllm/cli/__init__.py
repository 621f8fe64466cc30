"""The ``fedllm`` command: one module per command, all registered here.

Bad input ends with one line, ``fedllm: error: <what, where>``, and a non-zero exit, before anything is
written. Each command module has ``register(subparsers)`` (its parser, with ``handler=run``) and
``run(args) -> int``; this module only builds the parser from :data:`COMMANDS` and turns errors into that
one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType

import fedllm
from fedllm.cli import audit, certs, client, compare, export, predict, report, server, simulate
from fedllm.cli import run as run_command
from fedllm.cli.args import EXIT_USAGE, Parser
from fedllm.errors import FedllmError

# In the order `fedllm --help` lists them.
COMMANDS: tuple[ModuleType, ...] = (
    simulate,
    audit,
    compare,
    report,
    certs,
    server,
    client,
    run_command,
    export,
    predict,
)


def build_parser() -> Parser:
    parser = Parser(prog="fedllm", description="Federated DP fine-tuning of BERT classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {fedllm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except FedllmError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
