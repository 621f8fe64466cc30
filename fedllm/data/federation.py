"""The federation's data: every client's train and test split, the central test set and the label space.

The coordinator and every simulated node call :func:`load_federated` on their own and must agree on who
holds which row without talking to each other. So the result is a pure function of (config, client ids,
seed), and nothing depends on directory listing order; :func:`federation_data` memoizes it per process.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from fedllm.config.schema import DataConfig, FederationConfig
from fedllm.data.partition import PARTITIONS, partition_pool, per_file_groups, sample, split_client
from fedllm.data.readers import read_records
from fedllm.data.records import ClientSplit, FederatedData, Record, to_dataset
from fedllm.data.sources import load_source
from fedllm.errors import ConfigError, DataError
from fedllm.paths import shared_data_dir

NODE_SOURCE = "nodes"  # data.source of a deployed run: every node reads its own file, named in its profile


def load_federated(cfg: DataConfig, client_ids: Sequence[str], seed: int) -> FederatedData:
    """Deterministic in (cfg, client_ids, seed): every simulated node recomputes it and must get the same
    partition.

    Order of work: load, keep_labels filter, fix the label space (checking every row against it), take the
    central test set (the source's own, capped, or held out by fraction), subsample the training pool,
    partition it among clients (client i gets partition i), and split each client's share into train/test.
    The central test set is taken before max_examples and partitioning so it stays the same when only the
    number of clients or the quick-run size changes.
    """
    ids = _check_config(cfg, client_ids)
    if cfg.source == NODE_SOURCE:
        return _coordinator_side(cfg, seed)
    if cfg.central_test is not None:
        raise ConfigError(f"data.central_test: only used with data.source = '{NODE_SOURCE}' (a deployed run)")
    source = load_source(cfg, seed)
    if cfg.partition == "per-file" and source.files is None:
        raise ConfigError(
            f"data.partition: 'per-file' needs data.source to be a directory with one file per client, "
            f"got '{cfg.source}'"
        )
    pool, central = source.pool, source.central
    if cfg.keep_labels is not None:
        pool, central = (
            _keep(pool, cfg.keep_labels),
            None if central is None else _keep(central, cfg.keep_labels),
        )
        present = {r.label for r in pool + (central or ())}
        absent = [label for label in cfg.keep_labels if label not in present]
        if absent:
            raise ConfigError(f"data.keep_labels: no rows in '{cfg.source}' have label(s) {', '.join(absent)}")
    label_names = _label_space(cfg.labels, pool + (central or ()))
    index = {name: i for i, name in enumerate(label_names)}

    if central is None:
        n_central = round(cfg.central_test_fraction * len(pool))
        if cfg.max_central_test is not None:
            n_central = min(n_central, cfg.max_central_test)
        central, pool = sample(pool, n_central, seed, "central-test")
    elif cfg.max_central_test is not None:
        central, _ = sample(central, cfg.max_central_test, seed, "central-test-cap")
    if cfg.max_examples is not None:
        pool, _ = sample(pool, cfg.max_examples, seed, "max-examples")

    if cfg.partition == "per-file":
        assert source.files is not None
        groups = per_file_groups(pool, source.files, ids)
    else:
        groups = partition_pool(pool, index, cfg, len(ids), seed)
    clients = tuple(
        split_client(cid, group, index, cfg.test_fraction, seed) for cid, group in zip(ids, groups, strict=True)
    )
    return FederatedData(label_names=label_names, clients=clients, central_test=to_dataset(central, index))


def _coordinator_side(cfg: DataConfig, seed: int) -> FederatedData:
    """A deployed run: the coordinator holds no client's rows, only the fixed label space and, optionally,
    its own central test file (``data.central_test``, ``${VAR}`` expanded). Clients load their own files."""
    if cfg.labels is None:
        raise ConfigError(
            f"data.labels: required with data.source = '{NODE_SOURCE}': the coordinator sees no client data, so"
            " the scenario must fix the label space"
        )
    labels = tuple(cfg.labels)
    central: tuple[Record, ...] = ()
    if cfg.central_test:
        path = Path(os.path.expandvars(cfg.central_test)).expanduser()
        central = read_records(path, cfg.text_column, cfg.label_column)
        _label_space(labels, central)
        if cfg.max_central_test is not None:
            central, _ = sample(central, cfg.max_central_test, seed, "central-test-cap")
    index = {name: i for i, name in enumerate(labels)}
    return FederatedData(label_names=labels, clients=(), central_test=to_dataset(central, index))


def load_client_file(
    path: str | os.PathLike[str],
    text_column: str,
    label_column: str,
    label_names: Sequence[str],
    test_fraction: float,
    seed: int,
    client_id: str,
) -> ClientSplit:
    """For a deployed client that holds one file of its own; labels must be in label_names."""
    _check_fraction("data.test_fraction", test_fraction)
    records = read_records(path, text_column, label_column)
    names = _label_space(tuple(label_names), records)
    return split_client(client_id, records, {n: i for i, n in enumerate(names)}, test_fraction, seed)


def _check_fraction(field: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{field}: must be in [0, 1), got {value}")


def _check_config(cfg: DataConfig, client_ids: Sequence[str]) -> tuple[str, ...]:
    """Reject bad values before any file is read, naming the config key a person has to change."""
    if cfg.partition not in PARTITIONS:
        raise ConfigError(f"data.partition: must be one of {', '.join(PARTITIONS)}, got '{cfg.partition}'")
    if not cfg.alpha > 0:
        raise ConfigError(f"data.alpha: must be > 0, got {cfg.alpha}")
    _check_fraction("data.test_fraction", cfg.test_fraction)
    _check_fraction("data.central_test_fraction", cfg.central_test_fraction)
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise ConfigError(f"data.max_examples: must be >= 1 or unset, got {cfg.max_examples}")
    if cfg.max_central_test is not None and cfg.max_central_test < 0:
        raise ConfigError(f"data.max_central_test: must be >= 0 or unset, got {cfg.max_central_test}")
    if cfg.min_partition_size < 0:
        raise ConfigError(f"data.min_partition_size: must be >= 0, got {cfg.min_partition_size}")
    for field, values in (("data.labels", cfg.labels), ("data.keep_labels", cfg.keep_labels)):
        if values is not None:
            _check_unique(field, values)
    if cfg.labels is not None and cfg.keep_labels is not None:
        outside = [label for label in cfg.keep_labels if label not in cfg.labels]
        if outside:
            raise ConfigError(f"data.keep_labels: {', '.join(outside)} not in data.labels")
    ids = tuple(client_ids)
    _check_unique("clients", ids, what="client id")
    return ids


def _check_unique(field: str, values: Sequence[str], what: str = "label") -> None:
    if len(values) == 0:
        raise ConfigError(f"{field}: must not be empty")
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"{field}: every {what} must be a non-empty string, got {bad[0]!r}")
    doubled = sorted(v for v, n in Counter(values).items() if n > 1)  # linear: client ids run to 10,000s
    if doubled:
        raise ConfigError(f"{field}: duplicate {what}(s) {', '.join(doubled)}")


def _keep(records: tuple[Record, ...], keep: Sequence[str]) -> tuple[Record, ...]:
    wanted = set(keep)
    return tuple(r for r in records if r.label in wanted)


def _label_space(labels: tuple[str, ...] | None, records: Iterable[Record]) -> tuple[str, ...]:
    """Fix the label space once: the config's, with every row checked against it, or the data's own.

    Integer-like labels sort numerically so that "10" comes after "9".
    """
    records = tuple(records)
    if labels is None:
        found = {r.label for r in records}
        numeric = all(label.lstrip("-").isdigit() for label in found)
        return tuple(sorted(found, key=(lambda s: (int(s), s)) if numeric else None))
    labels = tuple(labels)
    _check_unique("data.labels", labels)
    allowed = set(labels)
    for r in records:
        if r.label not in allowed:
            raise DataError(
                r.path,
                f"unknown label '{r.label}'; the label space is {', '.join(labels)}",
                row=r.row,
                field=r.label_field,
            )
    return labels


# ------------------------------------------------------------------------------------------- memoized


def federation_data(cfg: FederationConfig) -> FederatedData:
    """The one partition every simulated node and the coordinator agree on (deterministic in the config).

    Memoized per process. Every simulated client builds the *whole* federation's partition to find its
    own share, and partitioning costs about 10 ms per client (flwr-datasets), so without the cache each
    newly sampled client of a 1,000-client federation spent 5-15 s repartitioning, every round. The key
    also holds the stat of a file or directory source and the shared-data location, so a changed file
    or ``FEDLLM_SHARED`` still gives fresh data; errors are never cached.
    """
    return _federation_data(cfg.data, tuple(cfg.client_ids), cfg.seed, _source_stamp(cfg.data.source))


@lru_cache(maxsize=4)
def _federation_data(data: DataConfig, client_ids: tuple[str, ...], seed: int, _stamp: tuple) -> FederatedData:
    return load_federated(data, client_ids, seed)


def _source_stamp(source: str) -> tuple:
    """(path, mtime, size) of every file the source may read, plus the environment that locates data."""
    stamp: list[object] = [os.environ.get("FEDLLM_SHARED", ""), os.environ.get("FEDLLM_CACHE", "")]
    for base in (Path(source).expanduser(), shared_data_dir() / source):
        try:
            if base.is_file():
                files = [base]
            elif base.is_dir():
                files = sorted(p for p in base.rglob("*") if p.is_file())
            else:
                continue
            stamp += [(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
        except (OSError, ValueError):
            stamp.append(object())  # unreadable now: a key that never matches, so no stale hit
    return tuple(stamp)
