"""``fedllm predict``: classify text with an exported model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("predict", help="classify text with an exported model (labels and scores)")
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text to classify")
    source.add_argument("--file", type=Path, metavar="F.csv", help="a CSV file of texts (with --text-column)")
    parser.add_argument("--text-column", metavar="C", help="the CSV column holding the text")
    parser.add_argument("--out", type=Path, metavar="F", help="write F.csv, or JSON Lines; default: print")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedllm.predict import predict, read_texts, write_predictions  # torch and transformers

    if args.file is not None and not args.text_column:
        raise ConfigError("--file: needs --text-column C, the column holding the text")
    if args.text is not None and args.text_column:
        raise ConfigError("--text-column: only with --file")
    texts = [args.text] if args.text is not None else read_texts(args.file, args.text_column)
    predictions = predict(args.model_dir, texts)
    write_predictions(predictions, args.out)
    if args.out is not None:
        print(f"{len(predictions)} prediction(s) written to {args.out}", file=sys.stderr)
    return 0
