"""The facts of a run's report (``report.json``; schema in ``docs/report-schema.md``), as plain data.

Epsilons come from the coordinator's ledger, not from ``metrics.json``, because the ledger is what the
clients signed; the audit verdict is included so that nobody reads a chart of numbers that did not check
out. Each client's effective budget and delta are the configuration's (``FederationConfig.client_settings``):
config owns what a client's ``[[clients]]`` entry overrides. ``curve`` adds the other runs of the same
scenario in the run's parent folder (``fedllm.report.curve``), so one report shows what each epsilon buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedllm.audit.empirical_store import load_result
from fedllm.audit.findings import DEFAULT_TOLERANCE, NON_PRIVATE, AuditResult
from fedllm.audit.verify import audit
from fedllm.config import FederationConfig, PrivacyConfig, from_dict
from fedllm.errors import ConfigError, FedllmError
from fedllm.ledger import LedgerEntry, read_entries
from fedllm.metrics import RunMetrics
from fedllm.report.curve import sibling_curve
from fedllm.run.rundir import RunDir
from fedllm.signing import fingerprint, public_path

SCHEMA = "fedllm-report"
SCHEMA_VERSION = 2  # 2: configured clients that never took part left `clients` for `never_sampled`


def finite(x: Any) -> float | None:
    """JSON has no infinity or NaN: such a value (or None) is None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class _Sources:
    raw: dict[str, Any]  # config.toml as plain data: every key, for the settings the report describes
    cfg: FederationConfig | None  # config.toml as config parses it, for each client's effective settings
    metrics: RunMetrics | None
    coord: list[LedgerEntry]


def _parsed(raw: dict[str, Any], source: str) -> FederationConfig | None:
    """The configuration as ``fedllm.config`` reads it. A key this version does not know (a newer or
    hand-edited file) is left out rather than refused, since a report must not reject a run; a file that
    still does not validate gives None, and budgets then come from the ledger's rows alone."""
    if not raw:
        return None
    known = {f.name for f in fields(FederationConfig)}
    try:
        return from_dict({k: v for k, v in raw.items() if k in known}, source=source)
    except ConfigError:
        return None


def _load(rd: RunDir) -> _Sources:
    if not rd.has_run():
        raise FedllmError(
            f"{rd.root}: neither {rd.ledger_path.name} nor {rd.metrics_path.name} here; not a fedllm run directory"
        )
    metrics = None
    if rd.metrics_path.is_file():
        try:
            metrics = rd.read_metrics()
        except (ValueError, KeyError, TypeError) as exc:
            raise FedllmError(f"{rd.metrics_path}: unreadable: {exc}") from exc
    coord = read_entries(rd.ledger_path) if rd.ledger_path.is_file() else []
    raw = rd.read_config_data()
    return _Sources(raw=raw, cfg=_parsed(raw, str(rd.config_path)), metrics=metrics, coord=coord)


def _settings(src: _Sources, rd: RunDir, rounds_completed: int) -> dict[str, Any]:
    raw, cfg, m = src.raw, src.cfg, src.metrics
    privacy = cfg.privacy if cfg else PrivacyConfig()
    dp = privacy.enabled if cfg else (m.dp if m else privacy.enabled)
    clients = {cid: cfg.client_settings(cid) for cid in cfg.client_ids} if cfg else {}
    model, data, training = raw.get("model", {}) or {}, raw.get("data", {}) or {}, raw.get("training", {}) or {}
    return {
        "dir": str(rd.root),
        "run_id": (m.run_id if m else None) or (src.coord[0].run_id if src.coord else None),
        "scenario": str(raw.get("name") or (m.scenario if m else "") or ""),
        "rounds_planned": int(raw.get("rounds") or (m.rounds_planned if m else 0)),
        "rounds_completed": rounds_completed,
        "stopped_early": m.stopped_early if m else None,
        "num_clients": int(raw.get("num_clients") or len(clients)),
        "clients_per_round": raw.get("clients_per_round"),
        "min_clients": raw.get("min_clients"),
        "model": {"name": model.get("name"), "mode": model.get("mode")},
        "data": {"source": data.get("source"), "partition": data.get("partition"), "alpha": data.get("alpha")},
        "training": {
            "local_steps": training.get("local_steps"),
            "batch_size": training.get("batch_size"),
            "learning_rate": training.get("learning_rate"),
        },
        "dp": dp,
        "accountant": privacy.accountant if dp else None,
        "epsilon_default": privacy.epsilon if dp else None,
        "delta_default": privacy.delta,
        "max_grad_norm": privacy.max_grad_norm if dp else None,
        "budgets": {cid: (s.epsilon if dp else None) for cid, s in clients.items()},
        "deltas": {cid: s.delta for cid, s in clients.items()},
        "secure_aggregation": bool((raw.get("secure_aggregation") or {}).get("enabled", False)),
        "tls": bool(raw.get("tls", False)) or (m is not None and m.transport == "tls"),
        "transport": m.transport if m else None,
        "wall_seconds": m.wall_seconds if m else None,
    }


def _rounds(src: _Sources) -> list[dict[str, Any]]:
    """Every round either file knows of: a round the ledger has but metrics lacks (a crash) still shows."""
    records = {r.round: r for r in (src.metrics.rounds if src.metrics else [])}
    numbers = sorted(set(records) | {e.round for e in src.coord if e.round > 0})
    out = []
    for n in numbers:
        r = records.get(n)
        out.append(
            {
                "round": n,
                "accuracy": finite(r.accuracy) if r else None,
                "loss": finite(r.loss) if r else None,
                "aggregated": r.aggregated if r else None,
                "federated_accuracy": finite(r.federated_accuracy) if r else None,
            }
        )
    return out


def _took_part(src: _Sources, settings: dict[str, Any], rd: RunDir) -> tuple[list[str], list[str]]:
    """The clients the report details (a row in the coordinator's ledger, a status in ``metrics.json`` or a
    folder of their own: clients of ``config.toml`` first, in its order, then any other in the ledger) and
    the configured clients with none of these. A federation registers 10,000 clients and samples 10 a round:
    one entry with per-round series for each registered client made a 9 MB page about the 20 that took part."""
    root = rd.clients_root
    seen = {d.name for d in root.iterdir() if d.is_dir()} if root.is_dir() else set()
    seen |= {cid for r in (src.metrics.rounds if src.metrics else []) for cid in r.clients}
    in_ledger = dict.fromkeys(e.client_id for e in src.coord)
    configured = settings["budgets"]
    details = [cid for cid in configured if cid in in_ledger or cid in seen]
    details += [cid for cid in in_ledger if cid not in configured]
    never = [cid for cid in configured if cid not in in_ledger and cid not in seen]
    return details, never


def _clients(
    src: _Sources, settings: dict[str, Any], rounds: list[int], rd: RunDir, ids: list[str], spent: dict[str, float]
) -> list[dict]:
    """``spent``: each client's spend from its own ledger where the audit read one (it counts rounds the
    coordinator recorded as dropped, whose rows only the client holds); the report never shows less."""
    dp = settings["dp"]
    metric_status = {
        (cid, r.round): c.status for r in (src.metrics.rounds if src.metrics else []) for cid, c in r.clients.items()
    }
    rows_of: dict[str, list[LedgerEntry]] = {}
    for e in src.coord:
        rows_of.setdefault(e.client_id, []).append(e)
    out = []
    for cid in ids:
        rows = rows_of.get(cid, [])
        by_round = {e.round: e for e in rows}
        private = dp and not any(e.accountant == NON_PRIVATE for e in rows)
        eps_series: list[float | None] = []
        status_series: list[str | None] = []
        current: float | None = 0.0 if private else None
        for n in rounds:
            e = by_round.get(n)
            if e is not None and e.status == "trained" and private:
                current = finite(e.epsilon)
            eps_series.append(current)
            status_series.append(metric_status.get((cid, n)) or (e.status if e is not None else None))
        trained = [e for e in rows if e.status == "trained"]
        budget = finite(rows[-1].budget_epsilon) if rows and private else settings["budgets"].get(cid)
        delta = rows[-1].delta if rows else settings["deltas"].get(cid, settings["delta_default"])
        key = public_path(rd.client(cid).key_path)
        out.append(
            {
                "id": cid,
                "budget_epsilon": budget if private else None,
                "delta": delta,
                "final_epsilon": _final_epsilon(trained, spent.get(cid)) if private else None,
                "rounds_trained": len(trained),
                "epsilon_per_round": eps_series,
                "status_per_round": status_series,
                "key_fingerprint": fingerprint(key.read_text()) if key.is_file() else None,
            }
        )
    return out


def _final_epsilon(trained: list[LedgerEntry], own: float | None) -> float | None:
    coordinator = finite(trained[-1].epsilon) if trained else 0.0
    own = finite(own) if own is not None else None
    return max(coordinator, own) if coordinator is not None and own is not None else coordinator


def _audit_summary(run_dir: Path) -> tuple[dict[str, Any], AuditResult | None]:
    try:
        result = audit(run_dir, DEFAULT_TOLERANCE)
    except FedllmError as exc:
        summary = {"ok": None, "status": None, "verdict": f"not audited: {exc}", "tolerance": DEFAULT_TOLERANCE}
        return {**summary, "findings": [], "notes": [], "unverified": [], "gaps": [], "clients": []}, None
    data = result.to_dict()
    keep = (
        *("ok", "status", "verdict", "tolerance", "same_accountant_rtol"),
        *("findings", "notes", "unverified", "gaps", "clients"),
    )
    return {k: data[k] for k in keep}, result


def build_report(run_dir: Path) -> dict[str, Any]:
    """The facts of ``report.json`` (see ``docs/report-schema.md``); JSON-safe: no infinities, no NaN."""
    rd = RunDir(run_dir)
    src = _load(rd)
    rounds = _rounds(src)
    completed = len(src.metrics.rounds) if src.metrics else len(rounds)
    settings = _settings(src, rd, completed)
    m = src.metrics
    audit_summary, result = _audit_summary(rd.root)
    spent = {c.client: c.reported_epsilon for c in result.clients if c.reported_epsilon is not None} if result else {}
    took_part, never = _took_part(src, settings, rd)
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": settings,
        "initial": {
            "accuracy": finite(m.initial_accuracy) if m else None,
            "loss": finite(m.initial_loss) if m else None,
        },
        "rounds": rounds,
        "clients": _clients(src, settings, [r["round"] for r in rounds], rd, took_part, spent),
        "never_sampled": {"count": len(never), "ids": never},
        "audit": audit_summary,
        "empirical_audit": _empirical(rd.root),
        "curve": sibling_curve(rd.root),
    }


def _empirical(run_dir: Path) -> list[dict[str, Any]]:
    """Per audited client: the reported (theoretical) epsilon beside the one-run empirical lower bound."""
    result = load_result(run_dir)
    if result is None:
        return []
    keep = ("client", "adversary", "canaries", "guesses", "guesses_in", "guesses_out", "correct", "confidence")
    data = result.to_dict()
    return [
        {
            **{k: data[k] for k in keep},
            "delta": result.delta,
            "theoretical_epsilon": finite(result.theoretical_epsilon),
            "lower_bound": result.lower_bound,
            "violation": result.violation,
            "dp": result.dp,
            "reference_epsilon": finite(result.reference_epsilon),
            "audited_run": result.run_dir,
        }
    ]
