"""What every ``fedllm`` command shares: the parser whose errors are one line, and flag value types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from fedllm.errors import ConfigError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but errors are our one-line format and exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}: must be >= 1, got {value}")
        return value

    return parse


def positive_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected a number, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: must be a finite number > 0, got {text}")
        return value

    return parse
