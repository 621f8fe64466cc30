"""The records against each other: each ledger's hash chain, the coordinator's rows against the client's
own ledger, and every coordinator row against the key the client registered.

Trust model: the auditor trusts each client's public key at ``DIR/clients/<id>/node_key.pub`` (obtained
from the client, not from the coordinator) and each client's own ledger; it trusts nothing the
coordinator wrote. See ``docs/audit.md`` for what this can and cannot detect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fedllm.audit.findings import (
    EPSILON_EDITED,
    MECHANISM_EDITED,
    ROW_DELETED,
    ROW_EDITED,
    ROW_UNKNOWN_TO_CLIENT,
    ROWS_REORDERED,
    SETTINGS_CHANGED,
    SIGNATURE_INVALID,
    SIGNATURE_MISSING,
    SIGNATURE_OTHER_KEY,
    Findings,
    fmt,
    rel_close,
    row_name,
)
from fedllm.ledger import ChainCheck, LedgerEntry
from fedllm.run.rundir import ClientDir
from fedllm.signing import fingerprint, public_path, same_key, verify


@dataclass
class ClientView:
    client: str
    coord: list[LedgerEntry]
    own: list[LedgerEntry] | None  # the client's own ledger (this run's rows), None when absent
    own_all: list[LedgerEntry] | None  # its rows from every run: its budget counts them all
    trusted_key: str | None


def chain_findings(check: ChainCheck, where: str, out: Findings) -> set[int]:
    """The ledger's chain check (:func:`fedllm.ledger.check_chain`) as findings; returns the seqs whose
    content no longer matches their hash."""
    for e in check.edited:
        out.add(ROW_EDITED, f"{where}: {row_name(e)}: content does not match its hash", e.client_id)
    for e in check.orphaned:
        out.add(ROW_DELETED, f"{where}: the row chained before {row_name(e)} is missing", e.client_id)
    if check.moved:
        out.add(
            ROWS_REORDERED,
            f"{where}: rows seq {', '.join(str(e.seq) for e in check.moved)} are out of chain order"
            f" (clients {', '.join(sorted({e.client_id for e in check.moved}))})",
        )
        out.bad_clients.update(e.client_id for e in check.moved)
    for a, b in check.seq_gaps:
        out.add(ROW_DELETED, f"{where}: rows seq {a}..{b} missing")
    if check.cut_after is not None:
        out.add(
            ROW_DELETED, f"{where}: rows after seq {check.cut_after} were removed (seq {check.max_seq_used} was used)"
        )
    return {e.seq for e in check.edited}


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


def check_signatures(view: ClientView, edited: set[int], out: Findings) -> set[int]:
    """Every coordinator row of a client must be signed by the key the client gave the auditor.

    Without that key nothing can be checked: the signed rows are returned as unproven (the client is then
    "unverified", see :func:`gaps`), which is not evidence that they were altered.
    """
    bad: set[int] = set()
    if view.trusted_key is None:
        return {e.seq for e in view.coord if e.signature or e.signer}
    trusted_fp = fingerprint(view.trusted_key)
    for e in view.coord:
        if not e.signature:
            out.add(
                SIGNATURE_MISSING,
                f"coordinator ledger {row_name(e)} is unsigned, yet the client has a key",
                e.client_id,
            )
            bad.add(e.seq)
        elif e.signer and not same_key(e.signer, view.trusted_key):
            out.add(
                SIGNATURE_OTHER_KEY,
                f"coordinator ledger {row_name(e)} is signed by key {fingerprint(e.signer)},"
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
                    f"coordinator ledger {row_name(e)} was altered after client {e.client_id} signed it{detail}",
                    e.client_id,
                )
            else:
                out.add(
                    SIGNATURE_OTHER_KEY,
                    f"coordinator ledger {row_name(e)}: signature does not verify with client {e.client_id}'s"
                    f" trusted key {trusted_fp} (made with another key, or the row was altered and re-hashed)",
                    e.client_id,
                )
            bad.add(e.seq)
    return bad


def by_key(rows: Iterable[LedgerEntry], status: str) -> dict[tuple[str, int], list[LedgerEntry]]:
    """Rows of one status grouped by (run, round), in seq order: a resumed run may repeat a round."""
    out: dict[tuple[str, int], list[LedgerEntry]] = {}
    for e in rows:
        if e.status == status:
            out.setdefault((e.run_id, e.round), []).append(e)
    return out


def cross_check(view: ClientView, out: Findings, notes: list[str], dropped: set[tuple[str, int]]) -> set[int]:
    """The coordinator's trained rows must be the client's own trained rows: same rounds, same mechanism.

    Rows are paired per (run, round) in order, so a round legitimately trained twice (a coordinator that
    crashed after filing it and redid it on resume) pairs with the client's two rows rather than being
    called a duplicate. Every trained or refused round in the client's ledger must be in the coordinator's:
    this is what catches a coordinator ledger whose last round(s) were cut and whose chain was rebuilt, which
    no check of that ledger alone can see. (A reservation without an outcome, or one that failed, may
    honestly have no coordinator row: the client never answered. It is counted in the spend, not flagged.)

    ``dropped``: (client, round) pairs the coordinator's ``metrics.json`` records as dropped. A client that
    trained but answered after the stage's timeout has a trained row of its own and none at the coordinator,
    which is what an honest slow round and a cut row both look like; the coordinator said so at the time,
    and the spend is counted from the client's own ledger either way, so it is a note that the coordinator's
    ledger understates this client, not a deleted row.
    """
    differ: set[int] = set()
    if view.own is None:
        return differ
    mine, theirs = by_key(view.own, "trained"), by_key(view.coord, "trained")
    for key in sorted(set(mine) | set(theirs)):
        own_rows, coord_rows = mine.get(key, []), theirs.get(key, [])
        for c in own_rows[len(coord_rows) :]:
            if (view.client, key[1]) in dropped:
                notes.append(
                    f"client {view.client} trained round {key[1]} (its own ledger, seq {c.seq}, epsilon"
                    f" {fmt(c.epsilon)}) but the coordinator recorded it as dropped (reply late or lost): the"
                    " coordinator's ledger understates this client; its spend is counted from its own ledger"
                )
                continue
            out.add(
                ROW_DELETED,
                f"coordinator ledger lacks client {view.client}'s trained round {key[1]}"
                f" (present in the client's own ledger, seq {c.seq}, epsilon {fmt(c.epsilon)})",
                view.client,
            )
        for e in coord_rows[len(own_rows) :]:
            out.add(
                ROW_UNKNOWN_TO_CLIENT,
                f"coordinator ledger {row_name(e)}: the client's own ledger has no such trained round",
                e.client_id,
            )
            differ.add(e.seq)
        for e, c in zip(coord_rows, own_rows, strict=False):
            differ |= _pair_differs(e, c, out)
    mine, theirs = by_key(view.own, "refused"), by_key(view.coord, "refused")
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


def _pair_differs(e: LedgerEntry, c: LedgerEntry, out: Findings) -> set[int]:
    """A coordinator row ``e`` against the client's own row ``c`` for the same trained round."""
    differ: set[int] = set()
    if e.mechanism != c.mechanism:
        out.add(
            MECHANISM_EDITED,
            f"coordinator ledger {row_name(e)}: mechanism {e.mechanism.as_dict()} differs from the client's own"
            f" ledger {c.mechanism.as_dict()}",
            e.client_id,
        )
        differ.add(e.seq)
    if not rel_close(e.epsilon, c.epsilon, 1e-12):
        out.add(
            EPSILON_EDITED,
            f"coordinator ledger {row_name(e)} reports epsilon {fmt(e.epsilon)}, the client's own ledger"
            f" {fmt(c.epsilon)}",
            e.client_id,
        )
        differ.add(e.seq)
    if e.delta != c.delta:
        out.add(
            SETTINGS_CHANGED,
            f"coordinator ledger {row_name(e)}: delta {e.delta:g} differs from the client's {c.delta:g}",
            e.client_id,
        )
        differ.add(e.seq)
    return differ


def gaps(view: ClientView, private: bool, folder: ClientDir) -> list[str]:
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
            f"client {view.client}: no own ledger at {folder.ledger_path}; its spend rests on the"
            " coordinator's ledger alone, whose cut rounds would not show"
        )
    signed = sum(1 for e in view.coord if e.signature or e.signer)
    if view.trusted_key is None and (private or signed):
        lines.append(
            f"client {view.client}: no trusted key at {public_path(folder.key_path)}; its {signed} signed"
            " row(s) in the coordinator ledger cannot be checked"
        )
    return lines


def trusted_key(folder: ClientDir) -> str | None:
    """The public key the client handed to the auditor, if it did."""
    path = public_path(folder.key_path)
    return path.read_text().strip() if path.is_file() else None
