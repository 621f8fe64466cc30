"""Atomic writes: a reader sees the old file or the new one, never half; modes hold from the first byte."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedllm import files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replace_keeps_nothing_but_the_new_file(tmp_path) -> None:
    path = tmp_path / "sub" / "m.json"
    files.atomic_write_json(path, {"a": 1})
    files.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]  # no temporary file left


def test_private_files_are_private_from_the_first_byte(tmp_path, monkeypatch) -> None:
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(_mode(src))  # the temporary file, before it gets the name
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    files.atomic_write_text(tmp_path / "secret", "coins", mode=files.PRIVATE_MODE)
    assert seen == [0o600] and _mode(tmp_path / "secret") == 0o600


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.json"
    files.atomic_write_json(path, {"old": True})

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        files.atomic_write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_no_nan_in_json(tmp_path) -> None:
    with pytest.raises(ValueError):
        files.atomic_write_json(tmp_path / "m.json", {"x": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_create_new_never_replaces(tmp_path) -> None:
    path = tmp_path / "key"
    assert files.create_new(path, b"first", mode=files.PRIVATE_MODE) is True
    assert files.create_new(path, b"second", mode=files.PRIVATE_MODE) is False
    assert path.read_bytes() == b"first" and _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]
