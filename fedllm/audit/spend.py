"""Each client's spend, recomputed: epsilon row by row with the run's accountant, the final epsilon with an
independent one, and the budget checked against every statement of it.

The run reports an epsilon per client. The audit does not take that number on trust: it recomputes it from
the mechanisms recorded in the ledger, once with the accountant the run used (which must agree exactly:
it is the same computation) and once with Google's ``dp-accounting`` PLD accountant (an independent
implementation, which must agree within a stated tolerance). Both come from :mod:`fedllm.accounting`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedllm.accounting import PRV_EPS_ERROR, Mechanism, epsilon_of_mechanisms, independent_epsilon
from fedllm.audit.crosscheck import ClientView, by_key
from fedllm.audit.findings import (
    BUDGET_CHANGED,
    BUDGET_EXCEEDED,
    BUDGET_RAISED,
    EPSILON_EDITED,
    EPSILON_MISMATCH,
    NON_PRIVATE,
    SAME_ACCOUNTANT_RTOL,
    SETTINGS_CHANGED,
    ClientAudit,
    Findings,
    fmt,
    rel_close,
    row_name,
)
from fedllm.run.rundir import CONFIG


@dataclass(frozen=True)
class Configured:
    """What ``config.toml`` states about privacy: DP on or off, the accountant, each client's budget."""

    enabled: bool
    accountant: str
    budgets: dict[str, float]  # client -> epsilon budget, in the configuration's client order


def spend_sequence(view: ClientView) -> tuple[list[Mechanism], dict[int, int], int, int]:
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
    trained, refused = by_key(view.coord, "trained"), by_key(view.coord, "refused")
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


def _budget(view: ClientView, cfg: Configured | None, out: Findings) -> float | None:
    """One value, the configured one, the client's own: every disagreement is a finding, and the strictest
    statement of the budget is the one the spend is held to."""
    cid = view.client
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
    config_budget = cfg.budgets.get(cid) if cfg is not None else None
    if cfg is not None and cid not in cfg.budgets:
        out.add(SETTINGS_CHANGED, f"client {cid} is in the ledger but not among config.toml's clients", cid)
    if coord_budget is not None and config_budget is not None and coord_budget != config_budget:
        kind = BUDGET_RAISED if coord_budget > config_budget else BUDGET_CHANGED
        out.add(kind, f"client {cid}: ledger budget {coord_budget:g} != config.toml budget {config_budget:g}", cid)
    own_budgets = sorted({e.budget_epsilon for e in view.own or []})
    own_budget = own_budgets[0] if own_budgets else None
    if len(own_budgets) > 1:
        out.add(BUDGET_CHANGED, f"client {cid}'s own ledger records budgets {own_budgets}", cid)
    for name, value in (("coordinator ledger", coord_budget), (CONFIG, config_budget)):
        if value is not None and own_budget is not None and value != own_budget:
            kind = BUDGET_RAISED if value > own_budget else BUDGET_CHANGED
            out.add(
                kind, f"client {cid}: {name} budget {value:g} != the client's own ledger budget {own_budget:g}", cid
            )
    candidates = [b for b in (own_budget, config_budget, coord_budget) if b is not None]
    return min(candidates) if candidates else None


def audit_client(
    view: ClientView,
    cfg: Configured | None,
    tolerance: float,
    tainted: set[int],
    out: Findings,
    notes: list[str],
) -> ClientAudit:
    """One client's spend: budgets, epsilon row by row, the final epsilon against PLD, the budget held."""
    cid = view.client
    trained = [e for e in view.coord if e.status == "trained"]
    rows = view.coord or view.own or view.own_all or []
    if not rows:  # a client ledger with no row of this client: it spent nothing that could be checked
        private = cfg.enabled if cfg is not None else True
        kind = (cfg.accountant if cfg is not None else "-") if private else NON_PRIVATE
        budget = cfg.budgets.get(cid) if cfg is not None and private else None
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
                EPSILON_MISMATCH, f"coordinator ledger {row_name(e)} is non-private but claims epsilon {e.epsilon}", cid
            )
        reported = trained[-1].epsilon if trained else None
        return ClientAudit(cid, False, NON_PRIVATE, len(trained), reported, None, None, math.inf, delta, True)

    budget = _budget(view, cfg, out)

    # --- epsilon, row by row, with the run's accountant.
    mechanisms, upto, extra, own_upto = spend_sequence(view)
    if extra:
        notes.append(
            f"client {cid}: {extra} reserved spend(s) with no trained row in the coordinator ledger (failed rounds"
            " or earlier runs on this node) are counted, as the client's own budget counts them"
        )
    kind = accountants[0]
    for e in view.coord:
        if e.status not in ("trained", "refused"):
            continue
        expected = epsilon_of_mechanisms(kind, mechanisms[: upto[e.seq]], e.delta)
        if not rel_close(e.epsilon, expected, SAME_ACCOUNTANT_RTOL):
            why = " (row altered: hash, signature or client ledger disagree)" if e.seq in tainted else ""
            out.add(
                EPSILON_EDITED if e.seq in tainted else EPSILON_MISMATCH,
                f"coordinator ledger {row_name(e)} reports epsilon {fmt(e.epsilon, 6)} but its {kind} recomputation"
                f" over the rows up to it gives {fmt(expected, 6)}{why}",
                cid,
            )
    # --- the spend the audit reports: the coordinator's last trained row, or the client's own last row of this
    # run where that records more (rounds a cut coordinator ledger lacks, a reservation it never saw finish).
    claimed = trained[-1].epsilon if trained else None
    own_last = view.own[-1] if view.own else None
    recorded = own_last.epsilon if own_last is not None else None
    reported = max((x for x in (claimed, recorded) if x is not None), default=None)
    if claimed is not None and reported is not None and not rel_close(reported, claimed, SAME_ACCOUNTANT_RTOL):
        notes.append(
            f"client {cid}: its own ledger records epsilon {fmt(reported)} for this run, the coordinator ledger's"
            f" last trained row {fmt(claimed)}; the audit reports the client's"
        )
    covered = mechanisms[: max(upto[trained[-1].seq] if trained else 0, own_upto)]
    recomputed_final = epsilon_of_mechanisms(kind, covered, delta) if covered and delta else 0.0
    independent = independent_epsilon(covered, delta) if covered and delta else 0.0
    if reported is not None and independent > 0:
        diff = abs(reported - independent)
        allowed = max(tolerance * independent, PRV_EPS_ERROR)
        understated = reported < independent - allowed
        # RDP is a looser upper bound than PLD: for it only an understatement is a mismatch.
        if understated or (kind in ("prv", "pld") and diff > allowed):
            out.add(
                EPSILON_MISMATCH,
                f"client {cid} reports final epsilon {fmt(reported)}, dp-accounting PLD gives {fmt(independent)}"
                f" (|diff| {diff:.4f} > tolerance {tolerance:.0%} relative, {PRV_EPS_ERROR} absolute)",
                cid,
            )

    # --- budget never exceeded: by the rows' own claims, and by the recomputation of everything spent.
    if budget is not None:
        total = epsilon_of_mechanisms(kind, mechanisms, delta) if mechanisms and delta else 0.0
        over = [e for e in view.coord if e.epsilon > e.budget_epsilon or e.epsilon > budget * (1 + 1e-9)]
        if over or total > budget * (1 + 1e-9):
            where = f" (first at {row_name(over[0])})" if over else ""
            spent = max([total, *(e.epsilon for e in over)])
            out.add(BUDGET_EXCEEDED, f"client {cid} spent epsilon {fmt(spent)} > budget {budget:g}{where}", cid)
        if extra and total > (recomputed_final or 0.0):
            notes.append(f"client {cid}: all reservations together: epsilon {fmt(total)} of budget {budget:g}")
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
