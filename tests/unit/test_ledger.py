"""The ledger is append-only and tamper-evident, and a corrupt one is never overwritten."""

from __future__ import annotations

import sqlite3
from itertools import pairwise

import pytest

from fedllm.accounting import Mechanism
from fedllm.errors import FedllmError
from fedllm.ledger import Ledger, check_chain, make_entry, read_entries


def _entry(round_: int, client: str = "a", eps: float = 1.0):
    return make_entry(
        run_id="r1",
        round=round_,
        client_id=client,
        status="trained",
        mechanism=Mechanism(1.0, 0.02, 10, 1.0),
        delta=1e-5,
        accountant="prv",
        epsilon=eps,
        budget_epsilon=8.0,
    )


def _filled(tmp_path, n=4):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        for r in range(1, n + 1):
            ledger.append(_entry(r, eps=float(r)))
    return path


def _raw(path):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("DROP TRIGGER entries_no_delete")
    return conn


def test_chain_intact_after_appends(tmp_path):
    with Ledger(_filled(tmp_path)) as ledger:
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2, 3, 4]
        assert entries[0].prev_hash == "0" * 64
        assert all(b.prev_hash == a.hash for a, b in pairwise(entries))
        assert ledger.verify_chain() == []


def test_sqlite_refuses_update_and_delete(tmp_path):
    path = _filled(tmp_path)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE entries SET epsilon = 0.1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM entries")


def test_edited_epsilon_is_detected(tmp_path):
    path = _filled(tmp_path)
    _raw(path).execute("UPDATE entries SET epsilon = 0.5 WHERE round = 3")
    with Ledger(path) as ledger:
        assert ledger.verify_chain() == ["row seq 3: content does not match its hash (edited)"]


def test_deleted_row_is_detected(tmp_path):
    path = _filled(tmp_path)
    _raw(path).execute("DELETE FROM entries WHERE round = 2")
    with Ledger(path) as ledger:
        problems = ledger.verify_chain()
    assert any("missing" in p for p in problems) and any("chain broken" in p for p in problems)


def test_reordered_rows_are_detected(tmp_path):
    path = _filled(tmp_path)
    conn = _raw(path)
    conn.execute("UPDATE entries SET seq = 100 WHERE seq = 2")
    conn.execute("UPDATE entries SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE entries SET seq = 3 WHERE seq = 100")
    with Ledger(path) as ledger:
        assert any("chain broken" in p for p in ledger.verify_chain())


def test_corrupt_file_gives_clear_error_and_is_left_alone(tmp_path):
    path = tmp_path / "ledger.sqlite"
    junk = b"this is not a database" * 100
    path.write_bytes(junk)
    with pytest.raises(FedllmError, match=r"ledger\.sqlite: not a readable privacy ledger"):
        Ledger(path)
    assert path.read_bytes() == junk


def test_spent_reads_reserved_rows_in_order(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        m1, m2 = Mechanism(1.0, 0.02, 10, 1.0), Mechanism(2.0, 0.02, 5, 1.0)
        for m in (m1, m2):
            ledger.append(
                make_entry(
                    run_id="r",
                    round=1,
                    client_id="a",
                    status="reserved",
                    mechanism=m,
                    delta=1e-5,
                    accountant="prv",
                    epsilon=1.0,
                    budget_epsilon=8.0,
                )
            )
        ledger.append(_entry(1, client="b"))
        assert ledger.spent("a") == [m1, m2]
        assert ledger.spent("b") == []


def test_cut_tail_is_detected_by_the_autoincrement_mark(tmp_path):
    """A deleted last row leaves no gap and no orphan; SQLite's sequence still remembers the seq it used."""
    path = _filled(tmp_path)
    _raw(path).execute("DELETE FROM entries WHERE seq = 4")
    with Ledger(path, readonly=True) as ledger:
        check = ledger.check_chain()
        assert check.cut_after == 3 and check.max_seq_used == 4 and not check.intact
        assert ledger.verify_chain() == ["rows after seq 3: missing (seq 4 was used; deleted rows)"]
    assert check_chain(read_entries(path)).intact  # without the mark, the chain alone cannot see it


def test_one_checker_classifies_deleted_and_moved_rows(tmp_path):
    path = _filled(tmp_path)
    _raw(path).execute("DELETE FROM entries WHERE seq = 2")
    check = check_chain(read_entries(path))
    assert [e.seq for e in check.orphaned] == [3] and check.moved == () and check.seq_gaps == ()
    path = _filled(tmp_path / "b")
    conn = _raw(path)
    conn.execute("UPDATE entries SET seq = 100 WHERE seq = 2")
    conn.execute("UPDATE entries SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE entries SET seq = 3 WHERE seq = 100")
    check = check_chain(read_entries(path))
    assert [e.seq for e in check.moved] == [2, 3, 4] and check.orphaned == () and check.edited == ()


def test_readonly_open_never_modifies_the_file(tmp_path):
    """An auditor's reads leave the evidence byte for byte as it was; an empty file reads as an empty ledger
    without gaining a schema, and a read-only ledger refuses to append."""
    path = _filled(tmp_path)
    before = path.read_bytes()
    assert [e.round for e in read_entries(path)] == [1, 2, 3, 4]
    with Ledger(path, readonly=True) as ledger:
        assert ledger.verify_chain() == []
        with pytest.raises(FedllmError, match="read-only"):
            ledger.append(_entry(5))
    assert path.read_bytes() == before
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    assert read_entries(empty) == []
    assert empty.read_bytes() == b""
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(FedllmError, match="not a readable privacy ledger"):
        read_entries(junk)
    assert junk.read_bytes() == b"not a database" * 100
