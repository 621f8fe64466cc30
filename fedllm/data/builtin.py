"""The built-in data sets a scenario names by ``data.source``: banking77, medical-abstracts (both from the
shared data folder), synthetic (generated) and medmcqa (:mod:`fedllm.data.medmcqa`).

Each is a function of the seed only, so every node that loads it gets the same rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from fedllm.data.medmcqa import medmcqa
from fedllm.data.partition import rng
from fedllm.data.readers import read_records
from fedllm.data.records import Record, Source
from fedllm.errors import DataError
from fedllm.paths import shared_data_dir

_SYNTHETIC_ROWS = 2000
SYNTHETIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "finance": ("bank", "loan", "interest", "market", "stock", "budget", "invest", "credit"),
    "health": ("doctor", "fever", "clinic", "vaccine", "symptom", "nurse", "therapy", "patient"),
    "sports": ("match", "goal", "team", "coach", "league", "score", "player", "stadium"),
    "weather": ("rain", "storm", "cloud", "forecast", "sunny", "wind", "snow", "humid"),
}
_SYNTHETIC_FILLER = tuple(
    "the a of and to in is was for on with as by at from this that it we they said today very some more "
    "about after before while where when then there here other people day week year new old".split()
)


def _shared_folder(name: str) -> Path:
    folder = shared_data_dir() / name
    if not folder.is_dir():
        raise DataError(
            str(folder),
            f"built-in data set '{name}' not found; set FEDLLM_SHARED to the shared folder that holds data/{name}/",
        )
    return folder


def _banking77(_seed: int) -> Source:
    folder = _shared_folder("banking77")
    return Source(
        pool=read_records(folder / "train.csv", "text", "category"),
        central=read_records(folder / "test.csv", "text", "category"),
    )


def _medical_abstracts(_seed: int) -> Source:
    folder = _shared_folder("medical-abstracts")
    names_file = folder / "medical_tc_labels.csv"
    # Read the label table with the row reader too: its ids play the label, its names the text.
    names = {r.label: r.text.strip() for r in read_records(names_file, "condition_name", "condition_label")}
    pool = []
    for r in read_records(folder / "medical_tc_test.csv", "medical_abstract", "condition_label"):
        if r.label not in names:
            raise DataError(
                r.path,
                f"unknown label '{r.label}'; {names_file} defines {', '.join(names)}",
                row=r.row,
                field=r.label_field,
            )
        pool.append(r._replace(label=names[r.label]))
    return Source(pool=tuple(pool))


@functools.lru_cache(maxsize=8)
def _synthetic(seed: int) -> Source:
    """A keyword task a small model learns in seconds: each label's sentences carry three of its keywords
    among random filler words, so tests and smoke runs can check that federated training improves accuracy
    without any download."""
    gen = rng(seed, "synthetic")
    names = sorted(SYNTHETIC_KEYWORDS)
    records = []
    for i in range(_SYNTHETIC_ROWS):
        label = names[i % len(names)]
        words = [str(w) for w in gen.choice(_SYNTHETIC_FILLER, size=9)]
        words += [str(w) for w in gen.choice(SYNTHETIC_KEYWORDS[label], size=3, replace=False)]
        gen.shuffle(words)
        records.append(Record(" ".join(words), label, "synthetic", i + 1, "label"))
    return Source(pool=tuple(records))


BUILTINS: dict[str, Callable[[int], Source]] = {
    "medmcqa": medmcqa,
    "banking77": _banking77,
    "medical-abstracts": _medical_abstracts,
    "synthetic": _synthetic,
}
BUILTIN_SOURCES: tuple[str, ...] = tuple(BUILTINS)
