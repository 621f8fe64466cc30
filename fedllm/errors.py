"""Errors a user can act on.

Every error raised for bad input is a :class:`FedllmError`; the command line prints its message on one
line and exits non-zero, so the message itself must name the file, row, field or flag at fault.
"""

from __future__ import annotations


class FedllmError(Exception):
    """Bad input or state the user must fix; the message names what and where."""


class ConfigError(FedllmError):
    """A scenario, profile or flag value is invalid."""


class DataError(FedllmError):
    """A data file cannot be used as given."""

    def __init__(self, path: str, problem: str, *, row: int | None = None, field: str | None = None):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {problem}")
        self.path = str(path)
        self.row = row
        self.field = field


class BudgetExhausted(FedllmError):
    """A client's next round would spend more epsilon than its budget allows."""
