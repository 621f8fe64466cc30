"""Seeded sampling and the split of a training pool among clients: IID, Dirichlet (label-skewed) or per file.

Every node computes the same split without talking to the others, so randomness comes only from generators
seeded by a SHA-256 of the seed and a purpose string (:func:`rng`), never from Python's per-process salted
``hash()`` nor global RNG state.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedllm.config.schema import DataConfig
from fedllm.data.records import ClientSplit, Record, to_dataset
from fedllm.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "per-file")


def rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose, so e.g. changing max_examples leaves the central test set alone."""
    digest = hashlib.sha256(f"{seed}|{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample(records: Sequence[Record], n: int, seed: int, purpose: str) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
    """Pick n rows by a seeded shuffle; (picked, rest), both in their original order."""
    if n >= len(records):
        return tuple(records), ()
    picked = np.zeros(len(records), dtype=bool)
    picked[rng(seed, purpose).permutation(len(records))[:n]] = True
    return (
        tuple(r for r, p in zip(records, picked, strict=True) if p),
        tuple(r for r, p in zip(records, picked, strict=True) if not p),
    )


def partition_pool(
    pool: tuple[Record, ...], index: Mapping[str, int], cfg: DataConfig, n_clients: int, seed: int
) -> list[tuple[Record, ...]]:
    """The split the Flower ecosystem calls IID / Dirichlet (flwr-datasets' partitioners).

    The pool is shuffled first because IidPartitioner takes contiguous shards; those shards are computed here
    directly (``tests/unit/test_data.py`` pins them to IidPartitioner's). Only the labels and row indices go
    into Dirichlet's Arrow table: the partitioner never looks at the text.
    """
    if len(pool) < n_clients:
        raise ConfigError(
            f"data.source: {len(pool)} training rows cannot be split among {n_clients} clients; use more "
            "data (data.max_examples) or fewer clients"
        )
    if cfg.partition == "dirichlet" and len(pool) < n_clients * cfg.min_partition_size:
        raise ConfigError(
            f"data.min_partition_size: {n_clients} clients x {cfg.min_partition_size} rows needs "
            f"{n_clients * cfg.min_partition_size} training rows, only {len(pool)} available; use fewer "
            "clients, more data or a smaller data.min_partition_size"
        )
    order = rng(seed, "pool-order").permutation(len(pool))
    if cfg.partition == "iid":
        # IidPartitioner.load_partition(i) is Dataset.shard(n, i, contiguous=True), i.e. np.array_split's i-th
        # shard of the shuffled order; taken directly, as datasets' per-shard select costs ~10 ms a client
        # (100 s at 10,000 clients, in the driver and again in every Ray worker).
        return [tuple(pool[i] for i in part) for part in np.array_split(order, n_clients)]
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"index": order.tolist(), "label": [index[pool[i].label] for i in order]})
    partitioner = DirichletPartitioner(
        num_partitions=n_clients,
        partition_by="label",
        alpha=float(cfg.alpha),
        min_partition_size=cfg.min_partition_size,
        self_balancing=True,
        seed=seed,
    )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # it warns on every resampling try; the outcome is what matters
            warnings.simplefilter("ignore")
            parts = [partitioner.load_partition(i)["index"] for i in range(n_clients)]
    except ValueError as exc:
        raise ConfigError(
            f"data.alpha: Dirichlet partitioning with alpha={cfg.alpha} could not give each of the "
            f"{n_clients} clients at least data.min_partition_size={cfg.min_partition_size} rows ({exc}); "
            "use a larger data.alpha, fewer clients or a smaller data.min_partition_size"
        ) from None
    return [tuple(pool[i] for i in part) for part in parts]


def per_file_groups(
    pool: tuple[Record, ...], files: tuple[str, ...], client_ids: tuple[str, ...]
) -> list[tuple[Record, ...]]:
    """Match files to clients by stem; failing that, by name order, which only makes sense one-to-one."""
    by_stem = {Path(f).stem: f for f in files}
    if set(by_stem) == set(client_ids):
        assigned = [by_stem[cid] for cid in client_ids]
    elif len(files) == len(client_ids):
        assigned = list(files)
    else:
        raise ConfigError(
            f"data.source: {len(files)} client files ({', '.join(Path(f).name for f in files)}) for "
            f"{len(client_ids)} clients ({', '.join(client_ids)}); give one file per client, named "
            "<client id>.csv (or .jsonl, .json, .parquet)"
        )
    rows: dict[str, list[Record]] = {f: [] for f in files}
    for r in pool:
        rows[r.path].append(r)
    for cid, f in zip(client_ids, assigned, strict=True):
        if not rows[f]:
            raise ConfigError(
                f"data.max_examples: client '{cid}' has no training rows left from {f} after the central "
                "test set and max_examples were taken; raise data.max_examples"
            )
    return [tuple(rows[f]) for f in assigned]


def split_client(
    client_id: str, records: Sequence[Record], index: Mapping[str, int], test_fraction: float, seed: int
) -> ClientSplit:
    """At least one test row whenever test_fraction > 0 and the client has two rows, so evaluation never
    divides by zero; seeded by client id so a client's split does not depend on the other clients."""
    n = len(records)
    n_test = 0 if test_fraction == 0 or n < 2 else min(max(round(n * test_fraction), 1), n - 1)
    test, train = sample(records, n_test, seed, f"client-split|{client_id}")
    return ClientSplit(client_id=client_id, train=to_dataset(train, index), test=to_dataset(test, index))
