"""The privacy ledger: an append-only, hash-chained SQLite record of every client's spend, round by round.

The same schema serves both sides. Each client keeps its own ledger (authoritative for its spend: it is
what the client's budget check reads after a restart) and the coordinator keeps the run's ledger (what a
privacy officer audits). Rows are never updated or deleted (SQLite triggers refuse it); a row's hash
covers its content and the previous row's hash, so an edited, deleted or reordered row breaks the chain.

This module is the one owner of the file: how it is opened (read-write by its writer, read-only by an auditor:
:func:`read_entries`, ``Ledger(path, readonly=True)``) and how its chain is checked (:func:`check_chain`,
which both :meth:`Ledger.verify_chain` and the audit use).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from fedllm.accounting import Mechanism
from fedllm.errors import FedllmError

SCHEMA_VERSION = 1
GENESIS = "0" * 64

# Statuses: "reserved" is the client's write-ahead record of a spend before it trains (counted even if the
# round then fails, so a crash can only over-count); the others are outcomes of a round.
STATUSES = ("reserved", "trained", "refused", "failed", "dropped")

_COLUMNS = """
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    status TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    sampling TEXT NOT NULL,
    neighbouring TEXT NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    epsilon REAL NOT NULL,
    budget_epsilon REAL NOT NULL,
    time TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    signer TEXT NOT NULL,
    signature TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries ({_COLUMNS});
CREATE INDEX IF NOT EXISTS entries_client ON entries (client_id, status);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    client_id: str
    status: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    sampling: str
    neighbouring: str
    delta: float
    accountant: str
    epsilon: float
    budget_epsilon: float
    time: str = ""
    config_hash: str = ""
    model_hash: str = ""
    signer: str = ""  # the client's public key (OpenSSH), when the row is signed
    signature: str = ""  # hex signature by that key over signed_payload()
    prev_hash: str = ""
    hash: str = ""
    seq: int = 0

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            max_grad_norm=self.max_grad_norm,
            sampling=self.sampling,
            neighbouring=self.neighbouring,
        )

    def content(self) -> dict[str, object]:
        """What the hash covers: everything but the chain fields themselves."""
        data = asdict(self)
        for key in ("seq", "prev_hash", "hash"):
            data.pop(key)
        return data

    def signed_payload(self) -> bytes:
        """What a client signs: the round's facts, not where or when the coordinator filed them."""
        data = self.content()
        for key in ("time", "signer", "signature"):
            data.pop(key)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def compute_hash(self, prev_hash: str) -> str:
        payload = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((prev_hash + payload).encode()).hexdigest()


def make_entry(
    *,
    run_id: str,
    round: int,
    client_id: str,
    status: str,
    mechanism: Mechanism,
    delta: float,
    accountant: str,
    epsilon: float,
    budget_epsilon: float,
    config_hash: str = "",
    model_hash: str = "",
    signer: str = "",
    signature: str = "",
) -> LedgerEntry:
    if status not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}")
    return LedgerEntry(
        run_id=run_id,
        round=round,
        client_id=client_id,
        status=status,
        delta=delta,
        accountant=accountant,
        epsilon=epsilon,
        budget_epsilon=budget_epsilon,
        config_hash=config_hash,
        model_hash=model_hash,
        signer=signer,
        signature=signature,
        **mechanism.as_dict(),
    )


_FIELD_NAMES = [f.name for f in fields(LedgerEntry)]
_REPORTED = [n for n in _FIELD_NAMES if n not in ("time", "prev_hash", "hash", "seq")]
METRIC_PREFIX = "ledger."


def entry_to_metrics(entry: LedgerEntry) -> dict[str, float | int | str]:
    """A client's row as Flower fit metrics (the transport); the coordinator rebuilds it unchanged."""
    return {METRIC_PREFIX + n: getattr(entry, n) for n in _REPORTED}


def entry_from_metrics(metrics: Mapping[str, object]) -> LedgerEntry:
    try:
        values = {n: metrics[METRIC_PREFIX + n] for n in _REPORTED}
    except KeyError as exc:
        raise ValueError(f"client report lacks ledger field {exc}") from exc
    types_ = {f.name: f.type for f in fields(LedgerEntry)}
    cast = {"int": int, "float": float, "str": str}
    return LedgerEntry(**{n: cast[str(types_[n])](v) for n, v in values.items()})


class Ledger:
    """One SQLite file in WAL mode; safe for one writer per file, which is how both sides use it.

    ``readonly=True`` is the auditor's way in: a read-only connection that creates no schema, no trigger and
    no row, so reading the evidence never alters it (an empty file reads as an empty ledger).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._has_table = True
        if readonly:
            self._open_readonly()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise FedllmError(f"{self.path}: ledger schema version {row[0]}, expected {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise FedllmError(f"{self.path}: not a readable privacy ledger ({exc}); it was left untouched") from exc

    def _open_readonly(self) -> None:
        if not self.path.is_file():
            raise FedllmError(f"{self.path}: no such ledger")
        try:
            self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise FedllmError(f"{self.path}: not a readable privacy ledger ({exc}); it was left untouched") from exc
        self._has_table = "entries" in tables

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def append(self, entry: LedgerEntry) -> LedgerEntry:
        """Chain the entry to the last row and write it durably (fsync'd before returning)."""
        if self.readonly:
            raise FedllmError(f"{self.path}: opened read-only; cannot append")
        with self._write() as conn:
            last = conn.execute("SELECT hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            prev = last[0] if last else GENESIS
            stamped = replace(entry, time=entry.time or datetime.now(UTC).isoformat(timespec="microseconds"))
            stamped = replace(stamped, prev_hash=prev, hash=stamped.compute_hash(prev))
            names = [n for n in _FIELD_NAMES if n != "seq"]
            cur = conn.execute(
                f"INSERT INTO entries ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [getattr(stamped, n) for n in names],
            )
            return replace(stamped, seq=int(cur.lastrowid or 0))

    def entries(
        self, *, client_id: str | None = None, status: str | None = None, run_id: str | None = None
    ) -> list[LedgerEntry]:
        clauses, args = [], []
        for column, value in (("client_id", client_id), ("status", status), ("run_id", run_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        if not self._has_table:
            return []
        rows = self._conn.execute(f"SELECT {', '.join(_FIELD_NAMES)} FROM entries {where} ORDER BY seq", args)
        return [LedgerEntry(*row) for row in rows]

    def spent(self, client_id: str) -> list[Mechanism]:
        """Every mechanism this client committed to, in order: the input of its accountant."""
        return [e.mechanism for e in self.entries(client_id=client_id, status="reserved")]

    def max_seq_used(self) -> int | None:
        """SQLite's AUTOINCREMENT high-water mark: a deleted *last* row leaves it above the last seq."""
        if not self._has_table:
            return None
        try:
            row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        except sqlite3.DatabaseError:
            return None
        return int(row[0]) if row else None

    def check_chain(self) -> ChainCheck:
        return check_chain(self.entries(), self.max_seq_used())

    def verify_chain(self) -> list[str]:
        """Problems with the hash chain, each naming the row; empty when intact."""
        return self.check_chain().problems()


def read_entries(path: str | Path) -> list[LedgerEntry]:
    """All rows in seq order, read through a read-only connection: an auditor never alters the evidence."""
    with Ledger(path, readonly=True) as ledger:
        return ledger.entries()


@dataclass(frozen=True)
class ChainCheck:
    """What is wrong with a ledger's hash chain, classified (empty everywhere when intact).

    A row whose ``prev_hash`` names no row in the ledger has lost its predecessor (``orphaned``: deleted).
    A row whose ``prev_hash`` names a row that exists, but not the one before it, has been moved
    (``moved``: reordered): the chain can still be followed, just not in seq order. A seq gap alone is
    ambiguous (a moved row also leaves one), so ``seq_gaps`` only lists gaps no orphan or move explains.
    A removed *last* row leaves no gap and no orphan; SQLite's AUTOINCREMENT mark above the last seq shows
    it (``cut_after``: the last seq left, with ``max_seq_used`` the one that was used).
    """

    edited: tuple[LedgerEntry, ...]  # content does not match its hash
    orphaned: tuple[LedgerEntry, ...]
    moved: tuple[LedgerEntry, ...]
    seq_gaps: tuple[tuple[int, int], ...]  # (first, last) missing seq
    cut_after: int | None
    max_seq_used: int | None

    @property
    def intact(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """One line per problem, each naming the row(s)."""
        lines = [f"row seq {e.seq}: content does not match its hash (edited)" for e in self.edited]
        lines += [f"row seq {e.seq}: chain broken (the row before it is missing: deleted)" for e in self.orphaned]
        lines += [f"row seq {e.seq}: chain broken (out of chain order: rows reordered)" for e in self.moved]
        lines += [f"row seq {a}..{b}: missing (deleted rows)" for a, b in self.seq_gaps]
        if self.cut_after is not None:
            lines.append(f"rows after seq {self.cut_after}: missing (seq {self.max_seq_used} was used; deleted rows)")
        return lines


def check_chain(entries: Sequence[LedgerEntry], max_seq_used: int | None = None) -> ChainCheck:
    """Classify every break of the hash chain of ``entries`` (in seq order); see :class:`ChainCheck`."""
    edited = tuple(e for e in entries if e.compute_hash(e.prev_hash) != e.hash)
    hashes = {e.hash for e in entries}
    orphaned = tuple(e for e in entries if e.prev_hash != GENESIS and e.prev_hash not in hashes)
    moved = []
    prev = GENESIS
    for e in entries:
        if e.prev_hash != prev and e not in orphaned:
            moved.append(e)
        prev = e.hash
    gaps: tuple[tuple[int, int], ...] = ()
    if entries and not orphaned and not moved:
        gaps = tuple((a.seq + 1, b.seq - 1) for a, b in itertools.pairwise(entries) if b.seq != a.seq + 1)
    last = entries[-1].seq if entries else 0
    cut = last if max_seq_used is not None and max_seq_used > last and not moved else None
    return ChainCheck(edited, orphaned, tuple(moved), gaps, cut, max_seq_used)
