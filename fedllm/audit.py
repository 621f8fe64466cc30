"""``fedllm audit DIR``: a privacy officer's independent check of a finished (or stopped) run.

The run reports an epsilon per client. The audit does not take that number on trust: it recomputes it from
the mechanisms recorded in the ledger, once with the accountant the run used (which must agree exactly:
it is the same computation) and once with Google's ``dp-accounting`` PLD accountant (an independent
implementation, which must agree within a stated tolerance). It then checks that the records themselves
are the ones the clients wrote: hash chains intact, every coordinator row signed by the client's trusted
key, the coordinator's rows equal to the client's own ledger, and budgets equal to the configured ones.

Trust model: the auditor trusts each client's public key at ``DIR/clients/<id>/node_key.pub`` (obtained
from the client, not from the coordinator) and each client's own ledger; it trusts nothing the
coordinator wrote. See ``docs/audit.md`` for what this can and cannot detect.

Every finding is one line that starts with the kind of problem (``epsilon edited``, ``row deleted``,
``rows reordered``, ``signature from another key``, ``budget raised``, ``budget exceeded``,
``epsilon mismatch``, ``empirical privacy violation``, ...) and names the ledger, row and client.

Three verdicts, because "nothing wrong was found" is not "everything was checked": ``clean`` (exit 0),
``violations`` (any finding, exit 1) and ``unverified`` (no finding, but some client the run lists did not
hand over its own ledger and key, exit 3). A coordinator that withholds the client ledgers can make its own
ledger say anything self-consistent (cut rounds included), so such a run is never called clean.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sqlite3
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedllm.accounting import PRV_EPS_ERROR, Mechanism, dp_accounting_epsilon, epsilon_of_mechanisms, history_of
from fedllm.config import PrivacyConfig
from fedllm.errors import FedllmError
from fedllm.ledger import GENESIS, Ledger, LedgerEntry
from fedllm.signing import fingerprint, public_path, same_key, verify

DEFAULT_TOLERANCE = 0.05
# The run's own accountant recomputed from the same records is the same computation: it must agree to this.
SAME_ACCOUNTANT_RTOL = 1e-6
NON_PRIVATE = "none"

# The kinds of finding; each message starts with one of these.
EPSILON_EDITED = "epsilon edited"
EPSILON_MISMATCH = "epsilon mismatch"
ROW_DELETED = "row deleted"
ROWS_REORDERED = "rows reordered"
ROW_EDITED = "row edited"
ROW_UNKNOWN_TO_CLIENT = "row not in client ledger"
MECHANISM_EDITED = "mechanism edited"
SIGNATURE_OTHER_KEY = "signature from another key"
SIGNATURE_INVALID = "signature invalid"
SIGNATURE_MISSING = "signature missing"
BUDGET_RAISED = "budget raised"
BUDGET_CHANGED = "budget changed"
BUDGET_EXCEEDED = "budget exceeded"
SETTINGS_CHANGED = "settings changed"
CONFIG_EDITED = "config edited"

# Verdicts, and the exit status of ``fedllm audit`` for each (2 is the CLI's usage/input error).
CLEAN = "clean"
VIOLATIONS = "violations"
UNVERIFIED = "unverified"
EXIT_STATUS = {CLEAN: 0, VIOLATIONS: 1, UNVERIFIED: 3}


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ClientAudit:
    """One client's numbers as the audit sees them; ``None`` where there is nothing to compute."""

    client: str
    private: bool
    accountant: str
    rounds_trained: int
    # The client's spend as recorded: its own ledger's last row of the run where that ledger is there (it
    # holds rounds a cut coordinator ledger lacks), else the coordinator ledger's last trained row; never
    # the lower of the two.
    reported_epsilon: float | None
    recomputed_epsilon: float | None  # the same spend, the run's accountant
    dp_accounting_epsilon: float | None  # the same spend, Google dp-accounting PLD
    budget: float | None
    delta: float | None
    ok: bool


@dataclass
class AuditResult:
    run_dir: Path
    run_ids: list[str]
    private: bool
    accountant: str
    tolerance: float
    clients: list[ClientAudit] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # clients whose own ledger or key was not handed over
    gaps: list[str] = field(default_factory=list)  # one line per missing piece: which client, which file
    flagged: list[str] = field(default_factory=list)  # clients some finding concerns

    @property
    def status(self) -> str:
        """``violations`` when anything was found; else ``unverified`` when a client's records are missing."""
        if self.findings:
            return VIOLATIONS
        return UNVERIFIED if self.unverified else CLEAN

    @property
    def ok(self) -> bool:
        """Clean: no finding and nothing left unchecked."""
        return self.status == CLEAN

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.status]

    def verdict(self) -> str:
        withheld = f"no own ledger or no key from client(s) {', '.join(self.unverified)}"
        if self.findings:
            kinds = "; ".join(sorted({f.split(":", 1)[0] for f in self.findings}))
            also = f" (also unverified: {withheld})" if self.unverified else ""
            return f"{len(self.findings)} finding(s): {kinds}{also}"
        if self.unverified:
            return f"unverified: {withheld}; the coordinator's record of them could not be checked"
        return "clean: every check passed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (JSON has no infinity: infinite epsilons and budgets become ``null``)."""
        return {
            "run_dir": str(self.run_dir),
            "run_ids": self.run_ids,
            "ok": self.ok,
            "status": self.status,
            "verdict": self.verdict(),
            "private": self.private,
            "accountant": self.accountant,
            "tolerance": self.tolerance,
            "same_accountant_rtol": SAME_ACCOUNTANT_RTOL,
            "clients": [{k: _json_num(v) for k, v in asdict(c).items()} for c in self.clients],
            "findings": list(self.findings),
            "notes": list(self.notes),
            "unverified": list(self.unverified),
            "gaps": list(self.gaps),
        }


def _json_num(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Findings:
    """Collects one-line findings and remembers which clients they concern."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bad_clients: set[str] = set()

    def add(self, kind: str, message: str, client: str | None = None) -> None:
        line = f"{kind}: {message}"
        if line not in self.lines:
            self.lines.append(line)
        if client is not None:
            self.bad_clients.add(client)


# ---------------------------------------------------------------------------------------------- reading


def read_entries(path: Path) -> list[LedgerEntry]:
    """All rows in seq order, read through a read-only connection so the audit never alters the evidence.

    (Opening a :class:`Ledger` would re-create its triggers and could checkpoint the WAL: harmless, but an
    auditor should not write to what it audits.) Falls back to :class:`Ledger` if SQLite refuses read-only.
    """
    names = [f.name for f in fields(LedgerEntry)]
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute(f"SELECT {', '.join(names)} FROM entries ORDER BY seq").fetchall()
        finally:
            conn.close()
        return [LedgerEntry(*row) for row in rows]
    except sqlite3.DatabaseError:
        with Ledger(path) as ledger:
            return ledger.entries()


def _max_seq_used(path: Path) -> int | None:
    """SQLite's AUTOINCREMENT high-water mark: a deleted *last* row leaves it above the last seq."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None
    return int(row[0]) if row else None


def _config_budgets(raw: dict[str, Any]) -> tuple[bool, str, dict[str, tuple[float, float]]]:
    """(dp on, accountant, {client: (epsilon budget, delta)}) as config.toml states them.

    A ``[[clients]]`` entry's own ``epsilon``/``delta`` wins over ``[privacy]``, as in the run itself.
    """
    defaults = PrivacyConfig()
    privacy = raw.get("privacy", {}) or {}
    enabled = bool(privacy.get("enabled", defaults.enabled))
    accountant = str(privacy.get("accountant", defaults.accountant))
    eps = float(privacy.get("epsilon", defaults.epsilon))
    delta = float(privacy.get("delta", defaults.delta))
    budgets = {}
    for c in raw.get("clients", []) or []:
        if isinstance(c, dict) and "id" in c:
            budgets[str(c["id"])] = (float(c.get("epsilon", eps)), float(c.get("delta", delta)))
    return enabled, accountant, budgets


def read_config(run_dir: Path) -> dict[str, Any]:
    """``config.toml`` as plain data: unknown keys are kept, since a report or audit must not reject a run."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedllmError(f"{path}: cannot read the run's configuration: {exc}") from exc


# ---------------------------------------------------------------------------------------------- epsilon


@lru_cache(maxsize=1024)
def _eps_cached(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    mechanisms = [Mechanism(noise_multiplier=s, sample_rate=q, steps=n, max_grad_norm=1.0) for s, q, n in history]
    return epsilon_of_mechanisms(kind, mechanisms, delta)


def run_accountant_epsilon(kind: str, mechanisms: Sequence[Mechanism], delta: float) -> float:
    """The run's accountant over these mechanisms (cached: many clients and rows share a history).

    Epsilon depends only on (noise, rate, steps) per step, which is exactly the Opacus history; keying the
    cache on it is what makes per-row checks cheap.
    """
    return _eps_cached(kind, tuple(history_of(mechanisms)), float(delta))


@lru_cache(maxsize=256)
def _pld_cached(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    merged = [Mechanism(noise_multiplier=s, sample_rate=q, steps=n, max_grad_norm=1.0) for s, q, n in history]
    return dp_accounting_epsilon(merged, delta)


def independent_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Google dp-accounting (PLD) over the same mechanisms.

    Consecutive rounds with equal noise and rate are passed as one self-composition of all their steps:
    the same mechanism, mathematically, but PLD composes it by one FFT power instead of round by round.
    """
    return _pld_cached(tuple(history_of(mechanisms)), float(delta))


def _rel_close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def _row(e: LedgerEntry) -> str:
    return f"row seq {e.seq} (client {e.client_id}, round {e.round})"


# ---------------------------------------------------------------------------------------------- chain


def _chain(entries: list[LedgerEntry], where: str, path: Path, out: _Findings) -> set[int]:
    """Hash-chain problems, classified; returns the seqs whose content no longer matches their hash.

    A row whose ``prev_hash`` names no row in the ledger has lost its predecessor (deleted). A row whose
    ``prev_hash`` names a row that exists, but not the one before it, has been moved (reordered): the
    chain can still be followed, just not in seq order. A seq gap alone is ambiguous (a moved row also
    leaves one), so it only counts as a deletion when no moved row explains it.
    """
    edited = {e.seq for e in entries if e.compute_hash(e.prev_hash) != e.hash}
    for e in entries:
        if e.seq in edited:
            out.add(ROW_EDITED, f"{where}: {_row(e)}: content does not match its hash", e.client_id)
    hashes = {e.hash for e in entries}
    orphans = [e for e in entries if e.prev_hash != GENESIS and e.prev_hash not in hashes]
    for e in orphans:
        out.add(ROW_DELETED, f"{where}: the row chained before {_row(e)} is missing", e.client_id)
    moved = []
    prev = GENESIS
    for e in entries:
        if e.prev_hash != prev and e not in orphans:
            moved.append(e)
        prev = e.hash
    if moved:
        out.add(
            ROWS_REORDERED,
            f"{where}: rows seq {', '.join(str(e.seq) for e in moved)} are out of chain order"
            f" (clients {', '.join(sorted({e.client_id for e in moved}))})",
        )
        out.bad_clients.update(e.client_id for e in moved)
    if entries and not orphans and not moved:
        gaps = [(a.seq, b.seq) for a, b in itertools.pairwise(entries) if b.seq != a.seq + 1]
        for a, b in gaps:
            out.add(ROW_DELETED, f"{where}: rows seq {a + 1}..{b - 1} missing")
    high = _max_seq_used(path)
    last = entries[-1].seq if entries else 0
    if high is not None and high > last and not moved:
        out.add(ROW_DELETED, f"{where}: rows after seq {last} were removed (seq {high} was used)")
    return edited


# ---------------------------------------------------------------------------------------------- audit


@dataclass
class _ClientView:
    client: str
    coord: list[LedgerEntry]
    own: list[LedgerEntry] | None  # the client's own ledger (this run's rows), None when absent
    own_all: list[LedgerEntry] | None  # its rows from every run: its budget counts them all
    trusted_key: str | None


# Signed facts that the client's own ledger row for the same round repeats (its model_hash is the hash of
# the model it received, not of the update it sent, so that one field is not compared).
_COMPARED = (
    "run_id",
    "round",
    "client_id",
    "status",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "sampling",
    "neighbouring",
    "delta",
    "accountant",
    "epsilon",
    "budget_epsilon",
    "config_hash",
)


def _fields_changed(e: LedgerEntry, own: list[LedgerEntry] | None) -> list[str]:
    """The fields in which a coordinator row differs from the client's own row for that round and outcome."""
    mine = next((c for c in own or [] if (c.run_id, c.round, c.status) == (e.run_id, e.round, e.status)), None)
    if mine is None:
        return []
    return [name for name in _COMPARED if getattr(mine, name) != getattr(e, name)]


def _check_signatures(view: _ClientView, edited: set[int], out: _Findings) -> set[int]:
    """Every coordinator row of a client must be signed by the key the client gave the auditor.

    Without that key nothing can be checked: the signed rows are returned as unproven (the client is then
    "unverified", see :func:`_gaps`), which is not evidence that they were altered.
    """
    bad: set[int] = set()
    if view.trusted_key is None:
        return {e.seq for e in view.coord if e.signature or e.signer}
    trusted_fp = fingerprint(view.trusted_key)
    for e in view.coord:
        if not e.signature:
            out.add(
                SIGNATURE_MISSING, f"coordinator ledger {_row(e)} is unsigned, yet the client has a key", e.client_id
            )
            bad.add(e.seq)
        elif e.signer and not same_key(e.signer, view.trusted_key):
            out.add(
                SIGNATURE_OTHER_KEY,
                f"coordinator ledger {_row(e)} is signed by key {fingerprint(e.signer)},"
                f" not client {e.client_id}'s trusted key {trusted_fp}",
                e.client_id,
            )
            bad.add(e.seq)
        elif not verify(view.trusted_key, e.signed_payload(), e.signature):
            changed = _fields_changed(e, view.own)
            if e.seq in edited or changed:
                detail = f" (differs from the client's own ledger in {', '.join(changed)})" if changed else ""
                out.add(
                    SIGNATURE_INVALID,
                    f"coordinator ledger {_row(e)} was altered after client {e.client_id} signed it{detail}",
                    e.client_id,
                )
            else:
                out.add(
                    SIGNATURE_OTHER_KEY,
                    f"coordinator ledger {_row(e)}: signature does not verify with client {e.client_id}'s trusted"
                    f" key {trusted_fp} (made with another key, or the row was altered and re-hashed)",
                    e.client_id,
                )
            bad.add(e.seq)
    return bad


def _by_key(rows: Iterable[LedgerEntry], status: str) -> dict[tuple[str, int], list[LedgerEntry]]:
    """Rows of one status grouped by (run, round), in seq order: a resumed run may repeat a round."""
    out: dict[tuple[str, int], list[LedgerEntry]] = {}
    for e in rows:
        if e.status == status:
            out.setdefault((e.run_id, e.round), []).append(e)
    return out


def _cross_check(view: _ClientView, out: _Findings) -> set[int]:
    """The coordinator's trained rows must be the client's own trained rows: same rounds, same mechanism.

    Rows are paired per (run, round) in order, so a round legitimately trained twice (a coordinator that
    crashed after filing it and redid it on resume) pairs with the client's two rows rather than being
    called a duplicate. Every trained or refused round in the client's ledger must be in the coordinator's:
    this is what catches a coordinator ledger whose last round(s) were cut and whose chain was rebuilt, which
    no check of that ledger alone can see. (A reservation without an outcome, or one that failed, may
    honestly have no coordinator row: the client never answered. It is counted in the spend, not flagged.)
    """
    differ: set[int] = set()
    if view.own is None:
        return differ
    mine, theirs = _by_key(view.own, "trained"), _by_key(view.coord, "trained")
    for key in sorted(set(mine) | set(theirs)):
        own_rows, coord_rows = mine.get(key, []), theirs.get(key, [])
        for c in own_rows[len(coord_rows) :]:
            out.add(
                ROW_DELETED,
                f"coordinator ledger lacks client {view.client}'s trained round {key[1]}"
                f" (present in the client's own ledger, seq {c.seq}, epsilon {_fmt(c.epsilon)})",
                view.client,
            )
        for e in coord_rows[len(own_rows) :]:
            out.add(
                ROW_UNKNOWN_TO_CLIENT,
                f"coordinator ledger {_row(e)}: the client's own ledger has no such trained round",
                e.client_id,
            )
            differ.add(e.seq)
        for e, c in zip(coord_rows, own_rows, strict=False):
            if e.mechanism != c.mechanism:
                out.add(
                    MECHANISM_EDITED,
                    f"coordinator ledger {_row(e)}: mechanism {e.mechanism.as_dict()} differs from the client's own"
                    f" ledger {c.mechanism.as_dict()}",
                    e.client_id,
                )
                differ.add(e.seq)
            if not _rel_close(e.epsilon, c.epsilon, 1e-12):
                out.add(
                    EPSILON_EDITED,
                    f"coordinator ledger {_row(e)} reports epsilon {_fmt(e.epsilon)}, the client's own ledger"
                    f" {_fmt(c.epsilon)}",
                    e.client_id,
                )
                differ.add(e.seq)
            if e.delta != c.delta:
                out.add(
                    SETTINGS_CHANGED,
                    f"coordinator ledger {_row(e)}: delta {e.delta:g} differs from the client's {c.delta:g}",
                    e.client_id,
                )
                differ.add(e.seq)
    mine, theirs = _by_key(view.own, "refused"), _by_key(view.coord, "refused")
    for key, own_rows in sorted(mine.items()):
        for c in own_rows[len(theirs.get(key, [])) :]:
            out.add(
                ROW_DELETED,
                f"coordinator ledger lacks client {view.client}'s refused round {key[1]}"
                f" (present in the client's own ledger, seq {c.seq})",
                view.client,
            )
    order = [e.round for e in view.coord if e.status == "trained"]
    if order != sorted(order):
        out.add(ROWS_REORDERED, f"client {view.client}'s trained rounds appear in the order {order}", view.client)
    return differ


def _spend_sequence(view: _ClientView) -> tuple[list[Mechanism], dict[int, int], int, int]:
    """The client's spend in the order it happened, and for each coordinator row how much of it preceded it.

    Without a client ledger this is simply the coordinator's trained rows. With one, it follows the
    client's own reservations (its budget counts every reservation, including rounds that then failed and
    earlier runs on the same node), taking each trained round's mechanism from the coordinator's row, so
    that the coordinator's numbers are what is being checked; a round the coordinator's ledger lacks keeps
    the client's own mechanism. Returns (mechanisms, {coordinator row seq: number of mechanisms its epsilon
    covers}, number of spends that never trained: failed or unfinished, number of mechanisms up to the
    client's own last row of this run: 0 without a client ledger).
    """
    if view.own_all is None:
        mechanisms: list[Mechanism] = []
        upto: dict[int, int] = {}
        for e in view.coord:
            if e.status == "trained":
                mechanisms.append(e.mechanism)
            upto[e.seq] = len(mechanisms)
        return mechanisms, upto, 0, 0
    trained, refused = _by_key(view.coord, "trained"), _by_key(view.coord, "refused")
    mechanisms, upto, extra, own_upto = [], {}, 0, 0
    this_run = {c.seq for c in view.own or []}
    open_reservation: dict[tuple[str, int], int] = {}  # (run, round) -> index of its reservation
    for c in view.own_all:
        key = (c.run_id, c.round)
        if c.status == "reserved":
            if key in open_reservation:  # reserved again without an outcome: the earlier one never finished
                extra += 1
            mechanisms.append(c.mechanism)
            open_reservation[key] = len(mechanisms) - 1
        elif c.status == "trained" and key in open_reservation:
            i = open_reservation.pop(key)
            if trained.get(key):
                e = trained[key].pop(0)
                mechanisms[i] = e.mechanism
                upto[e.seq] = i + 1
        elif c.status == "failed" and key in open_reservation:
            open_reservation.pop(key)
            extra += 1
        elif c.status == "refused" and refused.get(key):
            upto[refused[key].pop(0).seq] = len(mechanisms)
        if c.seq in this_run:
            own_upto = len(mechanisms)
    extra += len(open_reservation)
    for e in view.coord:  # rows the client never reserved (flagged by the cross-check) still get a number
        if e.seq not in upto:
            if e.status == "trained":
                mechanisms.append(e.mechanism)
            upto[e.seq] = len(mechanisms)
    return mechanisms, upto, extra, own_upto


def _audit_client(
    view: _ClientView,
    cfg: tuple[bool, str, dict[str, tuple[float, float]]] | None,
    tolerance: float,
    tainted: set[int],
    out: _Findings,
    notes: list[str],
) -> ClientAudit:
    cid = view.client
    trained = [e for e in view.coord if e.status == "trained"]
    rows = view.coord or view.own or view.own_all or []
    if not rows:  # a client ledger with no row of this client: it spent nothing that could be checked
        private = cfg[0] if cfg is not None else True
        kind = (cfg[1] if cfg is not None else "-") if private else NON_PRIVATE
        budget = cfg[2].get(cid, (None, None))[0] if cfg is not None and private else None
        return ClientAudit(cid, private, kind, 0, None, None, None, budget, None, True)
    accountants = sorted({e.accountant for e in rows})
    deltas = sorted({e.delta for e in rows})
    delta = deltas[0] if deltas else None
    private = NON_PRIVATE not in accountants
    if len(accountants) > 1:
        out.add(SETTINGS_CHANGED, f"client {cid}'s rows use accountants {accountants}", cid)
    if len(deltas) > 1:
        out.add(SETTINGS_CHANGED, f"client {cid}'s rows use deltas {deltas}", cid)

    if not private:
        finite = [e for e in view.coord if math.isfinite(e.epsilon)]
        for e in finite:
            out.add(
                EPSILON_MISMATCH, f"coordinator ledger {_row(e)} is non-private but claims epsilon {e.epsilon}", cid
            )
        reported = trained[-1].epsilon if trained else None
        return ClientAudit(cid, False, NON_PRIVATE, len(trained), reported, None, None, math.inf, delta, True)

    # --- budgets: one value, the configured one, the client's own.
    budgets = sorted({e.budget_epsilon for e in view.coord})
    if len(budgets) > 1:
        first = view.coord[0]
        changed = next(e for e in view.coord if e.budget_epsilon != first.budget_epsilon)
        kind = BUDGET_RAISED if changed.budget_epsilon > first.budget_epsilon else BUDGET_CHANGED
        out.add(
            kind,
            f"client {cid}'s budget_epsilon changes from {first.budget_epsilon:g} (seq {first.seq}) to"
            f" {changed.budget_epsilon:g} (seq {changed.seq})",
            cid,
        )
    coord_budget = max(budgets) if budgets else None
    config_budget = cfg[2].get(cid, (None, None))[0] if cfg is not None else None
    if cfg is not None and cid not in cfg[2]:
        out.add(SETTINGS_CHANGED, f"client {cid} is in the ledger but not among config.toml's clients", cid)
    if coord_budget is not None and config_budget is not None and coord_budget != config_budget:
        kind = BUDGET_RAISED if coord_budget > config_budget else BUDGET_CHANGED
        out.add(kind, f"client {cid}: ledger budget {coord_budget:g} != config.toml budget {config_budget:g}", cid)
    own_budgets = sorted({e.budget_epsilon for e in view.own or []})
    own_budget = own_budgets[0] if own_budgets else None
    if len(own_budgets) > 1:
        out.add(BUDGET_CHANGED, f"client {cid}'s own ledger records budgets {own_budgets}", cid)
    for name, value in (("coordinator ledger", coord_budget), ("config.toml", config_budget)):
        if value is not None and own_budget is not None and value != own_budget:
            kind = BUDGET_RAISED if value > own_budget else BUDGET_CHANGED
            out.add(
                kind, f"client {cid}: {name} budget {value:g} != the client's own ledger budget {own_budget:g}", cid
            )
    candidates = [b for b in (own_budget, config_budget, coord_budget) if b is not None]
    budget = min(candidates) if candidates else None  # the strictest statement of the budget is the one held to

    # --- epsilon, row by row, with the run's accountant.
    mechanisms, upto, extra, own_upto = _spend_sequence(view)
    if extra:
        notes.append(
            f"client {cid}: {extra} reserved spend(s) with no trained row in the coordinator ledger (failed rounds"
            " or earlier runs on this node) are counted, as the client's own budget counts them"
        )
    kind = accountants[0]
    for e in view.coord:
        if e.status not in ("trained", "refused"):
            continue
        expected = run_accountant_epsilon(kind, mechanisms[: upto[e.seq]], e.delta)
        if not _rel_close(e.epsilon, expected, SAME_ACCOUNTANT_RTOL):
            why = " (row altered: hash, signature or client ledger disagree)" if e.seq in tainted else ""
            out.add(
                EPSILON_EDITED if e.seq in tainted else EPSILON_MISMATCH,
                f"coordinator ledger {_row(e)} reports epsilon {_fmt(e.epsilon, 6)} but its {kind} recomputation"
                f" over the rows up to it gives {_fmt(expected, 6)}{why}",
                cid,
            )
    # --- the spend the audit reports: the coordinator's last trained row, or the client's own last row of this
    # run where that records more (rounds a cut coordinator ledger lacks, a reservation it never saw finish).
    claimed = trained[-1].epsilon if trained else None
    own_last = view.own[-1] if view.own else None
    recorded = own_last.epsilon if own_last is not None else None
    reported = max((x for x in (claimed, recorded) if x is not None), default=None)
    if claimed is not None and reported is not None and not _rel_close(reported, claimed, SAME_ACCOUNTANT_RTOL):
        notes.append(
            f"client {cid}: its own ledger records epsilon {_fmt(reported)} for this run, the coordinator ledger's"
            f" last trained row {_fmt(claimed)}; the audit reports the client's"
        )
    covered = mechanisms[: max(upto[trained[-1].seq] if trained else 0, own_upto)]
    recomputed_final = run_accountant_epsilon(kind, covered, delta) if covered and delta else 0.0
    independent = independent_epsilon(covered, delta) if covered and delta else 0.0
    if reported is not None and independent > 0:
        diff = abs(reported - independent)
        allowed = max(tolerance * independent, PRV_EPS_ERROR)
        understated = reported < independent - allowed
        # RDP is a looser upper bound than PLD: for it only an understatement is a mismatch.
        if understated or (kind in ("prv", "pld") and diff > allowed):
            out.add(
                EPSILON_MISMATCH,
                f"client {cid} reports final epsilon {_fmt(reported)}, dp-accounting PLD gives {_fmt(independent)}"
                f" (|diff| {diff:.4f} > tolerance {tolerance:.0%} relative, {PRV_EPS_ERROR} absolute)",
                cid,
            )

    # --- budget never exceeded: by the rows' own claims, and by the recomputation of everything spent.
    if budget is not None:
        total = run_accountant_epsilon(kind, mechanisms, delta) if mechanisms and delta else 0.0
        over = [e for e in view.coord if e.epsilon > e.budget_epsilon or e.epsilon > budget * (1 + 1e-9)]
        if over or total > budget * (1 + 1e-9):
            where = f" (first at {_row(over[0])})" if over else ""
            spent = max([total, *(e.epsilon for e in over)])
            out.add(
                BUDGET_EXCEEDED,
                f"client {cid} spent epsilon {_fmt(spent)} > budget {budget:g}{where}",
                cid,
            )
        if extra and total > (recomputed_final or 0.0):
            notes.append(f"client {cid}: all reservations together: epsilon {_fmt(total)} of budget {budget:g}")
    return ClientAudit(
        client=cid,
        private=True,
        accountant=kind,
        rounds_trained=max(len(trained), sum(1 for c in view.own or [] if c.status == "trained")),
        reported_epsilon=reported,
        recomputed_epsilon=recomputed_final,
        dp_accounting_epsilon=independent,
        budget=budget,
        delta=delta,
        ok=True,
    )


def _metrics_cross_check(run_dir: Path, coord: list[LedgerEntry], out: _Findings) -> None:
    """``metrics.json`` is a second witness of which rounds each client trained."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return
    from fedllm.metrics import read

    try:
        metrics = read(path)
    except (ValueError, KeyError, TypeError) as exc:
        out.add(CONFIG_EDITED, f"{path} is unreadable ({exc})")
        return
    trained = {(e.client_id, e.round): e for e in coord if e.status == "trained"}
    for record in metrics.rounds:
        for cid, c in record.clients.items():
            if c.status in ("trained", "rejected") and (cid, record.round) not in trained:
                out.add(
                    ROW_DELETED,
                    f"metrics.json says client {cid} trained round {record.round}, the coordinator ledger has no row",
                    cid,
                )


def _empirical_check(run_dir: Path, out: _Findings, notes: list[str]) -> None:
    """A one-run empirical audit stored with the run (``DIR/empirical/result.json``, ``fedllm/empirical.py``):
    its lower bound may not exceed the epsilon the audited client reported. It is never proof of privacy,
    so a bound below the claim is only a note."""
    from fedllm.empirical import EMPIRICAL_VIOLATION, load_result

    result = load_result(run_dir)
    if result is None:
        return
    if result.violation:
        out.add(
            EMPIRICAL_VIOLATION,
            f"{result.describe()}: the mechanism leaks more than its accountant reports (is the noise really added?)",
            result.client,
        )
    else:
        notes.append(f"empirical audit, {result.describe()}: a lower bound for this adversary, not a proof of privacy")
    if result.reference_run is not None:
        ref = "∞ (non-private)" if result.reference_epsilon is None else f"{result.reference_epsilon:.4f}"
        notes.append(f"empirical audit re-ran the config with canaries in {result.run_dir}; this run reported {ref}")


def audit(run_dir: Path, tolerance: float = DEFAULT_TOLERANCE) -> AuditResult:
    """Audit the run in ``run_dir``; raises :class:`FedllmError` only when it is not a run directory."""
    run_dir = Path(run_dir)
    coord_path = run_dir / "ledger.sqlite"
    if not coord_path.is_file():
        raise FedllmError(f"{run_dir}: no ledger.sqlite here; not a fedllm run directory")
    out = _Findings()
    notes: list[str] = []
    coord = read_entries(coord_path)
    edited = _chain(coord, "coordinator ledger", coord_path, out)
    run_ids = sorted({e.run_id for e in coord})

    raw_cfg = read_config(run_dir)
    cfg = _config_budgets(raw_cfg) if raw_cfg else None
    if cfg is None:
        notes.append("no config.toml: budgets are checked against the ledgers only")
    else:
        digest = hashlib.sha256((run_dir / "config.toml").read_bytes()).hexdigest()
        hashes = {e.config_hash for e in coord if e.config_hash}
        if hashes and digest not in hashes:
            out.add(CONFIG_EDITED, f"config.toml (sha256 {digest[:12]}) matches no row's config_hash")

    clients_dir = run_dir / "clients"
    ids: list[str] = list(dict.fromkeys(e.client_id for e in coord))
    if clients_dir.is_dir():
        for d in sorted(clients_dir.iterdir()):
            if d.is_dir() and (d / "ledger.sqlite").is_file() and d.name not in ids:
                ids.append(d.name)
    configured = list(cfg[2]) if cfg else []
    first_seen = {c: i for i, c in enumerate(ids)}
    ids.sort(key=lambda c: (configured.index(c) if c in configured else len(configured), first_seen[c]))
    gaps: dict[str, list[str]] = {}  # client -> what it did not hand over: the run is then unverified
    for cid in configured:
        if cid not in ids:
            what = f"client {cid} (config.toml) has no rows in any ledger and no own ledger at {clients_dir / cid}"
            if cfg and cfg[0]:  # a private run: only its own ledger can say it never trained
                gaps.setdefault(cid, []).append(f"{what}: never sampled, or left out")
            else:
                notes.append(f"{what}: never sampled, or left out")

    views: list[_ClientView] = []
    for cid in ids:
        own_path = clients_dir / cid / "ledger.sqlite"
        own_all = None
        if own_path.is_file():
            own_rows = read_entries(own_path)
            _chain(own_rows, f"client {cid}'s own ledger", own_path, out)
            own_all = [e for e in own_rows if e.client_id == cid]
        key_path = public_path(clients_dir / cid / "node_key")
        trusted = key_path.read_text().strip() if key_path.is_file() else None
        own = [e for e in own_all if e.run_id in run_ids] if own_all is not None and run_ids else own_all
        # "dropped" rows are the coordinator's own note that a client did not answer: no spend, nothing the
        # client could sign. They are in the hash chain (checked above) but are not the client's claims.
        claims = [e for e in coord if e.client_id == cid and e.status != "dropped"]
        views.append(_ClientView(cid, claims, own, own_all, trusted))

    clients: list[ClientAudit] = []
    for view in views:
        bad_sig = _check_signatures(view, edited, out)
        differ = _cross_check(view, out)
        tainted = edited | bad_sig | differ
        audited = _audit_client(view, cfg, tolerance, tainted, out, notes)
        clients.append(audited)
        missing = _gaps(view, audited.private, clients_dir / view.client)
        if missing:
            gaps.setdefault(view.client, []).extend(missing)
        elif view.trusted_key is None and view.coord:
            notes.append(f"client {view.client}: non-private, rows unsigned and no trusted key; signatures not checked")
    _metrics_cross_check(run_dir, coord, out)
    _empirical_check(run_dir, out, notes)

    private = any(c.private for c in clients) if clients else bool(cfg and cfg[0])
    if clients and not private:
        notes.append("non-private run (accountant 'none'): epsilon is infinite; no epsilon to recompute")
    accountants = sorted({c.accountant for c in clients}) or ([cfg[1]] if cfg else [])
    unproven = out.bad_clients | set(gaps)
    final = [ClientAudit(**{**asdict(c), "ok": c.client not in unproven}) for c in clients]
    return AuditResult(
        run_dir=run_dir,
        run_ids=run_ids,
        private=private,
        accountant=",".join(accountants),
        tolerance=tolerance,
        clients=final,
        findings=out.lines,
        notes=notes,
        unverified=list(gaps),
        gaps=[line for lines in gaps.values() for line in lines],
        flagged=sorted(out.bad_clients),
    )


def _gaps(view: _ClientView, private: bool, folder: Path) -> list[str]:
    """What a client did not hand over that its audit needs; each missing piece makes the run unverified.

    A private client's spend can only be checked against its own ledger: without it, a coordinator that cut
    rounds from its ledger (and rebuilt the chain) shows a smaller, self-consistent spend. Its rows can only
    be checked against the key it registered: without it, any signature passes as well as none. A
    non-private client has no spend to check; it needs its key only if its rows are signed (older runs, made
    before signing existed, have neither).
    """
    lines = []
    if private and view.own_all is None:
        lines.append(
            f"client {view.client}: no own ledger at {folder / 'ledger.sqlite'}; its spend rests on the"
            " coordinator's ledger alone, whose cut rounds would not show"
        )
    signed = sum(1 for e in view.coord if e.signature or e.signer)
    if view.trusted_key is None and (private or signed):
        lines.append(
            f"client {view.client}: no trusted key at {public_path(folder / 'node_key')}; its {signed} signed"
            " row(s) in the coordinator ledger cannot be checked"
        )
    return lines


# ---------------------------------------------------------------------------------------------- output


def print_audit(result: AuditResult, console: Any = None) -> None:
    """The per-client table, the tolerances used, the findings and the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    unverified = set(result.unverified) - set(result.flagged)
    title = f"Privacy audit of {result.run_dir}" + ("" if result.private else " (NON-PRIVATE run)")
    table = Table(title=title)
    for col in (
        "client",
        "rounds",
        "reported ε",
        f"recomputed ε ({result.accountant})",
        "dp-accounting ε (PLD)",
        "budget",
        "delta",
        "ok",
    ):
        table.add_column(col, justify="left" if col in ("client", "ok") else "right")
    for c in result.clients:
        table.add_row(
            c.client,
            str(c.rounds_trained),
            _fmt(c.reported_epsilon),
            _fmt(c.recomputed_epsilon),
            _fmt(c.dp_accounting_epsilon),
            _fmt(c.budget, 2),
            f"{c.delta:g}" if c.delta is not None else "-",
            "[green]yes[/]" if c.ok else ("[yellow]unverified[/]" if c.client in unverified else "[red]NO[/]"),
        )
    console.print(table)
    console.print(
        f"Same accountant must agree within {SAME_ACCOUNTANT_RTOL:g} relative; dp-accounting PLD within"
        f" {result.tolerance:.0%} relative (or {PRV_EPS_ERROR} absolute, PRV's error bound)."
    )
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    for finding in result.findings:
        console.print(f"FINDING: {finding}", style="red", highlight=False, markup=False)
    for gap in result.gaps:
        console.print(f"UNVERIFIED: {gap}", style="yellow", highlight=False, markup=False)
    style = {CLEAN: "bold green", UNVERIFIED: "bold yellow"}.get(result.status, "bold red")
    console.print(f"verdict: {result.verdict()}", style=style, highlight=False, markup=False)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tolerance: expected a number, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--tolerance: must be a relative tolerance in (0, 1), got {text}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit DIR [--tolerance T] [--json]`` to the ``fedllm`` command; dispatch via ``args.handler``."""
    parser = subparsers.add_parser("audit", help="recompute and verify a run's privacy record")
    parser.add_argument("dir", type=Path, help="the run directory (holds ledger.sqlite)")
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help=f"relative tolerance against dp-accounting's PLD epsilon (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--empirical",
        action="store_true",
        help="also run a one-run empirical audit (canaries; re-runs config.toml into DIR/empirical/ unless the run"
        " was itself audited) and flag a lower bound above the reported epsilon",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """0 when the audit is clean, 1 on any finding, 3 when nothing was found but a client's ledger or key is
    missing (``EXIT_STATUS``): a script that only tests for 0 never mistakes an unchecked run for a clean one."""
    if getattr(args, "empirical", False):
        from fedllm.empirical import audit_run

        audit_run(args.dir)  # stored in DIR/empirical/result.json, where audit() finds it
    result = audit(args.dir, args.tolerance)
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print_audit(result)
    return result.exit_status


def findings_of_kind(result: AuditResult, kinds: Iterable[str]) -> list[str]:
    """The findings that start with one of ``kinds``; convenient for reports and tests."""
    prefixes = tuple(f"{k}:" for k in kinds)
    return [f for f in result.findings if f.startswith(prefixes)]
