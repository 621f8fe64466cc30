"""``audit(run_dir, tolerance)``: a privacy officer's independent check of a finished (or stopped) run.

The run reports an epsilon per client; the audit recomputes it from the ledger (:mod:`fedllm.audit.spend`),
checks that the records are the ones the clients wrote (hash chains intact, every coordinator row signed by
the client's trusted key, the coordinator's rows equal to the client's own ledger:
:mod:`fedllm.audit.crosscheck`) and that budgets equal the configured ones. A run directory's metrics and
a stored empirical audit are further witnesses. What it concludes is an :class:`AuditResult`
(:mod:`fedllm.audit.findings`); the command that prints it is :mod:`fedllm.cli.audit`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fedllm.audit.crosscheck import (
    ClientView,
    chain_findings,
    check_signatures,
    cross_check,
    gaps,
    trusted_key,
)
from fedllm.audit.empirical_result import EMPIRICAL_VIOLATION
from fedllm.audit.empirical_store import load_result
from fedllm.audit.findings import (
    CONFIG_EDITED,
    DEFAULT_TOLERANCE,
    ROW_DELETED,
    SHOWN_IDS,
    AuditResult,
    ClientAudit,
    Findings,
    id_list,
)
from fedllm.audit.spend import Configured, audit_client
from fedllm.config import from_dict
from fedllm.errors import FedllmError
from fedllm.ledger import Ledger, LedgerEntry, check_chain
from fedllm.run.rundir import RunDir


def audit(run_dir: Path, tolerance: float = DEFAULT_TOLERANCE) -> AuditResult:
    """Audit the run in ``run_dir``; raises :class:`FedllmError` only when it is not a run directory."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if not run.ledger_path.is_file():
        raise FedllmError(f"{run_dir}: no {run.ledger_path.name} here; not a fedllm run directory")
    out = Findings()
    notes: list[str] = []
    coord, edited = _read_checked(run.ledger_path, "coordinator ledger", out)
    run_ids = sorted({e.run_id for e in coord})
    cfg = _configured(run, coord, out, notes)

    ids: list[str] = list(dict.fromkeys(e.client_id for e in coord))
    ids += [c for c in run.client_ids_on_disk() if c not in ids]
    configured = {c: i for i, c in enumerate(cfg.budgets)} if cfg else {}  # client -> place in config.toml
    first_seen = {c: i for i, c in enumerate(ids)}
    ids.sort(key=lambda c: (configured.get(c, len(configured)), first_seen[c]))
    never = [cid for cid in configured if cid not in first_seen]  # no row anywhere, no own ledger
    # A private run: only its own ledger could say such a client never trained, so the run is unverified.
    withheld = never if cfg and cfg.enabled else []
    never_lines = _never_sampled(run, never)
    if not withheld:
        notes.extend(never_lines)
    missing: dict[str, list[str]] = {}  # client -> what it did not hand over: the run is then unverified

    dropped = _recorded_dropped(run)
    views = [_view(run, cid, coord, run_ids, out) for cid in ids]
    clients: list[ClientAudit] = []
    for view in views:
        bad_sig = check_signatures(view, edited, out)
        differ = cross_check(view, out, notes, dropped)
        audited = audit_client(view, cfg, tolerance, edited | bad_sig | differ, out, notes)
        clients.append(audited)
        lacking = gaps(view, audited.private, run.client(view.client))
        if lacking:
            missing.setdefault(view.client, []).extend(lacking)
        elif view.trusted_key is None and view.coord:
            notes.append(f"client {view.client}: non-private, rows unsigned and no trusted key; signatures not checked")
    _metrics_cross_check(run, coord, out)
    _empirical_check(run_dir, out, notes)

    private = any(c.private for c in clients) if clients else bool(cfg and cfg.enabled)
    if clients and not private:
        notes.append("non-private run (accountant 'none'): epsilon is infinite; no epsilon to recompute")
    accountants = sorted({c.accountant for c in clients}) or ([cfg.accountant] if cfg else [])
    unproven = out.bad_clients | set(missing)
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
        unverified=[*withheld, *missing],
        gaps=[*(never_lines if withheld else []), *(line for lines in missing.values() for line in lines)],
        flagged=sorted(out.bad_clients),
    )


def _never_sampled(run: RunDir, never: list[str]) -> list[str]:
    """Configured clients with no row in any ledger and no own ledger: a line each, or, past a few (10,000
    registered, 20 sampled), one line that counts them and names the first; ``unverified`` lists them all."""
    if len(never) <= SHOWN_IDS:
        where = (
            f"client {cid} (config.toml) has no rows in any ledger and no own ledger at {run.client(cid).root}"
            for cid in never
        )
        return [f"{what}: never sampled, or left out" for what in where]
    return [
        f"{len(never)} clients (config.toml) have no rows in any ledger and no own ledger under {run.clients_root}:"
        f" never sampled, or left out ({id_list(never)})"
    ]


def _read_checked(path: Path, where: str, out: Findings) -> tuple[list[LedgerEntry], set[int]]:
    """A ledger's rows, read-only, with its chain check filed as findings; also the seqs found edited."""
    with Ledger(path, readonly=True) as ledger:
        rows = ledger.entries()
        edited = chain_findings(check_chain(rows, ledger.max_seq_used()), where, out)
    return rows, edited


def _view(run: RunDir, cid: str, coord: list[LedgerEntry], run_ids: list[str], out: Findings) -> ClientView:
    folder = run.client(cid)
    own_all = None
    if folder.ledger_path.is_file():
        own_rows, _ = _read_checked(folder.ledger_path, f"client {cid}'s own ledger", out)
        own_all = [e for e in own_rows if e.client_id == cid]
    own = [e for e in own_all if e.run_id in run_ids] if own_all is not None and run_ids else own_all
    # "dropped" rows are the coordinator's own note that a client did not answer: no spend, nothing the
    # client could sign. They are in the hash chain (checked above) but are not the client's claims.
    claims = [e for e in coord if e.client_id == cid and e.status != "dropped"]
    return ClientView(cid, claims, own, own_all, trusted_key(folder))


def _configured(run: RunDir, coord: list[LedgerEntry], out: Findings, notes: list[str]) -> Configured | None:
    """What config.toml says each client may spend, through the configuration's own reading of it
    (``FederationConfig.client_settings``: a ``[[clients]]`` entry's own epsilon wins over ``[privacy]``).

    An edited config.toml is a finding (its hash matches no row); one that no longer reads as a
    configuration is a finding when edited and a note otherwise, and its budgets are then checked against
    the ledgers only: an audit reports on a run, it never refuses one.
    """
    name = run.config_path.name
    try:
        raw: dict | None = run.read_config_data()
    except FedllmError as exc:  # not TOML at all
        raw, error = None, exc
    if raw == {}:
        notes.append(f"no {name}: budgets are checked against the ledgers only")
        return None
    digest = run.config_sha256()
    hashes = {e.config_hash for e in coord if e.config_hash}
    edited = bool(hashes) and digest not in hashes
    if edited:
        out.add(CONFIG_EDITED, f"{name} (sha256 {digest[:12]}) matches no row's config_hash")
    if raw is not None:
        try:
            cfg = from_dict(raw, source=str(run.config_path))
        except FedllmError as exc:  # TOML, but not a valid configuration
            error = exc
        else:
            budgets = {c.id: cfg.client_settings(c.id).epsilon for c in cfg.clients}
            return Configured(enabled=cfg.privacy.enabled, accountant=cfg.privacy.accountant, budgets=budgets)
    line = f"{name} does not read as a configuration ({error}); budgets are checked against the ledgers only"
    if edited:
        out.add(CONFIG_EDITED, line)
    else:
        notes.append(line)
    return None


def _recorded_dropped(run: RunDir) -> set[tuple[str, int]]:
    """(client, round) pairs ``metrics.json`` records as dropped; none where it is missing or unreadable
    (:func:`_metrics_cross_check` files that)."""
    if not run.metrics_path.is_file():
        return set()
    try:
        metrics = run.read_metrics()
    except (ValueError, KeyError, TypeError):
        return set()
    return {(cid, r.round) for r in metrics.rounds for cid, c in r.clients.items() if c.status == "dropped"}


def _metrics_cross_check(run: RunDir, coord: list[LedgerEntry], out: Findings) -> None:
    """``metrics.json`` is a second witness of which rounds each client trained."""
    path = run.metrics_path
    if not path.is_file():
        return
    try:
        metrics = run.read_metrics()
    except (ValueError, KeyError, TypeError) as exc:
        out.add(CONFIG_EDITED, f"{path} is unreadable ({exc})")
        return
    trained = {(e.client_id, e.round): e for e in coord if e.status == "trained"}
    for record in metrics.rounds:
        for cid, c in record.clients.items():
            if c.status in ("trained", "rejected") and (cid, record.round) not in trained:
                out.add(
                    ROW_DELETED,
                    f"{path.name} says client {cid} trained round {record.round}, the coordinator ledger has no row",
                    cid,
                )


def _empirical_check(run_dir: Path, out: Findings, notes: list[str]) -> None:
    """A one-run empirical audit stored with the run (``DIR/empirical/result.json``): its lower bound may
    not exceed the epsilon the audited client reported. It is never proof of privacy, so a bound below the
    claim is only a note."""
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
