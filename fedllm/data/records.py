"""The shapes data takes: a validated row, a loaded source, and the datasets a client trains and tests on.

A row (:class:`Record`) remembers the file and row it came from until the label space is fixed, so every later
check can still name where a bad value sits; the datasets a model sees hold only texts and label indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class TextDataset:
    """Label indices point into the federation's ``label_names``; tuples keep it hashable and immutable."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class ClientSplit:
    client_id: str
    train: TextDataset
    test: TextDataset


@dataclass(frozen=True)
class FederatedData:
    label_names: tuple[str, ...]
    clients: tuple[ClientSplit, ...]
    central_test: TextDataset


class Record(NamedTuple):
    """One validated row; it remembers where it came from so later checks can still name file and row."""

    text: str
    label: str
    path: str
    row: int
    label_field: str


@dataclass(frozen=True)
class Source:
    """A loaded source before partitioning.

    ``central`` is the source's own test split (None: hold one out by fraction); ``files`` lists the
    per-client files of a directory source, which per-file partitioning needs.
    """

    pool: tuple[Record, ...]
    central: tuple[Record, ...] | None = None
    files: tuple[str, ...] | None = None


def to_dataset(records: Iterable[Record], index: Mapping[str, int]) -> TextDataset:
    """Rows to what a model sees: their texts and their labels' positions in the fixed label space."""
    records = tuple(records)
    return TextDataset(texts=tuple(r.text for r in records), labels=tuple(index[r.label] for r in records))
