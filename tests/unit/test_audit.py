"""The audit recomputes every client's epsilon and catches, by name, each way of tampering with the record.

Runs are built directly (ledgers, signed rows, config.toml, metrics.json) with the real accountant and real
keys, which takes a second instead of the half minute a simulated run takes; the audit of a real
``fedllm simulate`` run is in ``tests/system/test_audit_run.py``. ``write_run`` lives in ``tests/support.py``,
shared with the report tests.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sqlite3
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric import ec
from support import CLIENTS, MECH, RUN_ID, rounds_epsilon, write_run

from fedllm.audit.findings import findings_of_kind
from fedllm.audit.verify import audit
from fedllm.cli import audit as audit_command
from fedllm.ledger import GENESIS, Ledger, LedgerEntry, make_entry, read_entries
from fedllm.signing import load_or_create_key, public_openssh, sign

# ---------------------------------------------------------------------------------------------- helpers


def _raw(path: Path) -> sqlite3.Connection:
    """What a tamperer does first: drop the append-only triggers."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
    conn.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    return conn


def _rows(path: Path) -> list[LedgerEntry]:
    return read_entries(path)


def _seq_of(path: Path, client: str, round_: int) -> int:
    return next(e.seq for e in _rows(path) if e.client_id == client and e.round == round_ and e.status == "trained")


def _rehash(path: Path) -> None:
    """A careful tamperer: recompute the whole hash chain after an edit so that it looks intact."""
    conn = _raw(path)
    prev = GENESIS
    for e in _rows(path):
        h = e.compute_hash(prev)
        conn.execute("UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, e.seq))
        prev = h
    conn.close()


def _kinds(result) -> set[str]:
    return {f.split(":", 1)[0] for f in result.findings}


def _exit_code(run_dir: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    audit_command.register(sub)
    args = parser.parse_args(["audit", str(run_dir), *extra])
    return args.handler(args)


@pytest.fixture(scope="module")
def honest_template(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("honest") / "run")


@pytest.fixture
def run_dir(honest_template, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(honest_template, dest)
    return dest


# ---------------------------------------------------------------------------------------------- honest


def test_honest_run_audits_clean(run_dir, capsys):
    result = audit(run_dir)
    assert result.findings == []
    assert result.ok and result.private and result.accountant == "prv"
    assert [c.client for c in result.clients] == list(CLIENTS)
    expected = rounds_epsilon("prv", 3, 1e-5)
    for c in result.clients:
        assert c.rounds_trained == 3
        assert c.reported_epsilon == expected
        assert math.isclose(c.recomputed_epsilon, expected, rel_tol=1e-9)
        assert math.isclose(c.dp_accounting_epsilon, expected, rel_tol=0.05)
        assert c.dp_accounting_epsilon != c.recomputed_epsilon  # a different implementation, not a copy
        assert c.budget == 8.0 and c.delta == 1e-5 and c.ok
    assert _exit_code(run_dir) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "5%" in out and "alpha" in out


def test_json_output_and_tolerance_flag(run_dir, capsys):
    assert _exit_code(run_dir, "--json", "--tolerance", "0.02") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["tolerance"] == 0.02 and data["findings"] == []
    assert {c["client"] for c in data["clients"]} == set(CLIENTS)
    argparse_fail = argparse.ArgumentParser()
    audit_command.register(argparse_fail.add_subparsers())
    with pytest.raises(SystemExit):
        argparse_fail.parse_args(["audit", str(run_dir), "--tolerance", "7"])


def test_failed_round_reservation_counts_and_is_noted(tmp_path):
    """The client's budget counts a reservation whose training then failed; the audit does too."""
    run = write_run(tmp_path / "run", fail_round={"beta": 2})
    result = audit(run)
    assert result.findings == []
    beta = next(c for c in result.clients if c.client == "beta")
    assert beta.rounds_trained == 2
    assert math.isclose(beta.reported_epsilon, rounds_epsilon("prv", 3, 1e-5))  # three spends, two trained rounds
    assert any("beta" in n and "reserved spend" in n for n in result.notes)


def test_a_round_trained_but_answered_too_late_is_a_note_and_counts_in_the_spend(tmp_path):
    """An honest slow client: it trained round 2, its reply missed the stage's timeout, the coordinator
    recorded it as dropped. Not a deleted row; the client's own ledger carries the spend, and the report
    shows that spend, never the coordinator's smaller one."""
    from fedllm.report.facts import build_report

    run = write_run(tmp_path / "run", late_round={"beta": 2})
    result = audit(run)
    assert result.findings == [] and result.status == "clean"
    beta = next(c for c in result.clients if c.client == "beta")
    assert math.isclose(beta.reported_epsilon, rounds_epsilon("prv", 3, 1e-5))
    assert any("beta trained round 2" in n and "recorded it as dropped" in n for n in result.notes)
    report = build_report(run)
    shown = next(c for c in report["clients"] if c["id"] == "beta")
    assert math.isclose(shown["final_epsilon"], rounds_epsilon("prv", 3, 1e-5))  # coordinator's rows say 2 rounds
    assert shown["rounds_trained"] == 2


def test_a_trained_round_missing_at_the_coordinator_without_a_dropped_record_is_a_deleted_row(tmp_path):
    """The same evidence without the coordinator's "dropped" record: a cut row, as before."""
    run = write_run(tmp_path / "run", late_round={"beta": 2})
    metrics = json.loads((run / "metrics.json").read_text())
    for record in metrics["rounds"]:
        record["clients"].pop("beta", None)
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = audit(run)
    assert [f for f in result.findings if "lacks client beta's trained round 2" in f]
    assert result.status == "violations"


def test_round_redone_after_a_coordinator_restart_audits_clean(run_dir):
    """A resumed run may train a round twice; both spends are real, signed and in the client's ledger."""
    key = load_or_create_key(run_dir / "clients" / "alpha" / "node_key")
    eps = rounds_epsilon("prv", 4, 1e-5)
    common = {"run_id": RUN_ID, "round": 3, "client_id": "alpha", "mechanism": MECH, "delta": 1e-5}
    common |= {"accountant": "prv", "epsilon": eps, "budget_epsilon": 8.0}
    with Ledger(run_dir / "clients" / "alpha" / "ledger.sqlite") as own:
        own.append(make_entry(**common, status="reserved"))
        own.append(make_entry(**common, status="trained"))
    entry = make_entry(**common, status="trained", config_hash=_rows(run_dir / "ledger.sqlite")[0].config_hash)
    with Ledger(run_dir / "ledger.sqlite") as coord:
        coord.append(replace(entry, signer=public_openssh(key), signature=sign(key, entry.signed_payload())))
    result = audit(run_dir)
    assert result.findings == []
    alpha = result.clients[0]
    assert alpha.rounds_trained == 4 and alpha.reported_epsilon == eps
    assert math.isclose(alpha.recomputed_epsilon, eps, rel_tol=1e-9)


def test_refused_rounds_audit_clean(tmp_path):
    run = write_run(tmp_path / "run", refuse_from={"gamma": 2})
    result = audit(run)
    assert result.findings == []
    gamma = next(c for c in result.clients if c.client == "gamma")
    assert gamma.rounds_trained == 1 and gamma.reported_epsilon == rounds_epsilon("prv", 1, 1e-5)


def test_non_private_run_is_reported_as_such(tmp_path, capsys):
    run = write_run(tmp_path / "run", dp=False)
    result = audit(run)
    assert result.findings == [] and not result.private
    assert all(
        not c.private and c.reported_epsilon == math.inf and c.recomputed_epsilon is None for c in result.clients
    )
    assert any("non-private" in n for n in result.notes)
    data = result.to_dict()
    assert data["clients"][0]["reported_epsilon"] is None  # JSON has no infinity
    json.dumps(data, allow_nan=False)
    assert _exit_code(run) == 0
    assert "NON-PRIVATE" in capsys.readouterr().out


def test_rdp_run_audits_clean(tmp_path):
    """RDP is a looser upper bound than PLD: an honest RDP run must not be flagged for being above PLD."""
    result = audit(write_run(tmp_path / "run", accountant="rdp", rounds=2))
    assert result.findings == []
    c = result.clients[0]
    assert c.reported_epsilon > c.dp_accounting_epsilon * 1.2


def test_not_a_run_directory(tmp_path):
    from fedllm.errors import FedllmError

    with pytest.raises(FedllmError, match=r"no ledger\.sqlite"):
        audit(tmp_path)
    assert not (tmp_path / "ledger.sqlite").exists()


# ---------------------------------------------------------------------------------------------- tampering


def test_epsilon_edited_in_a_row(run_dir):
    path = run_dir / "ledger.sqlite"
    seq = _seq_of(path, "beta", 2)
    _raw(path).execute("UPDATE entries SET epsilon = 0.5 WHERE seq = ?", (seq,))
    result = audit(run_dir)
    edited = findings_of_kind(result, ["epsilon edited"])
    assert edited and any(f"row seq {seq} " in f and "client beta" in f for f in edited)
    assert any(f"row seq {seq}" in f for f in findings_of_kind(result, ["row edited"]))
    assert not next(c for c in result.clients if c.client == "beta").ok
    assert next(c for c in result.clients if c.client == "alpha").ok
    assert _exit_code(run_dir) == 1


def test_epsilon_edited_and_chain_rehashed(run_dir):
    """Re-hashing the chain hides the edit from the hash check, not from the signature or the recomputation."""
    path = run_dir / "ledger.sqlite"
    seq = _seq_of(path, "alpha", 3)
    _raw(path).execute("UPDATE entries SET epsilon = 1.0 WHERE seq = ?", (seq,))
    _rehash(path)
    result = audit(run_dir)
    assert "row edited" not in _kinds(result)
    assert any(f"row seq {seq} " in f and "alpha" in f for f in findings_of_kind(result, ["epsilon edited"]))
    assert _exit_code(run_dir) == 1


def test_row_deleted(run_dir):
    path = run_dir / "ledger.sqlite"
    seq = _seq_of(path, "gamma", 2)
    _raw(path).execute("DELETE FROM entries WHERE seq = ?", (seq,))
    result = audit(run_dir)
    deleted = findings_of_kind(result, ["row deleted"])
    assert any(f"before row seq {seq + 1} " in f for f in deleted)  # the chain names where the hole is
    assert any("gamma's trained round 2" in f for f in deleted)  # the client's own ledger names what is missing
    assert _exit_code(run_dir) == 1


def test_last_row_deleted(run_dir):
    """The chain cannot show a missing tail, but SQLite's sequence and the client's ledger can."""
    path = run_dir / "ledger.sqlite"
    last = _rows(path)[-1]
    _raw(path).execute("DELETE FROM entries WHERE seq = ?", (last.seq,))
    result = audit(run_dir)
    deleted = findings_of_kind(result, ["row deleted"])
    assert any(f"after seq {last.seq - 1}" in f for f in deleted)
    assert any(f"{last.client_id}'s trained round {last.round}" in f for f in deleted)


def test_rows_reordered(run_dir):
    path = run_dir / "ledger.sqlite"
    a, b = _seq_of(path, "alpha", 1), _seq_of(path, "alpha", 2)
    conn = _raw(path)
    conn.execute("UPDATE entries SET seq = 1000 WHERE seq = ?", (a,))
    conn.execute("UPDATE entries SET seq = ? WHERE seq = ?", (a, b))
    conn.execute("UPDATE entries SET seq = ? WHERE seq = 1000", (b,))
    conn.close()
    result = audit(run_dir)
    reordered = findings_of_kind(result, ["rows reordered"])
    assert any(f"seq {a}" in f for f in reordered)
    assert any("alpha's trained rounds appear in the order [2, 1, 3]" in f for f in reordered)
    assert "row deleted" not in _kinds(result)  # a move is not a deletion
    assert _exit_code(run_dir) == 1


def test_signature_from_another_key(run_dir):
    """Someone re-signs beta's row with their own key (and files that key as the signer)."""
    path = run_dir / "ledger.sqlite"
    seq = _seq_of(path, "beta", 1)
    row = next(e for e in _rows(path) if e.seq == seq)
    forged = replace(row, epsilon=0.1)
    other = ec.generate_private_key(ec.SECP384R1())
    _raw(path).execute(
        "UPDATE entries SET epsilon = ?, signer = ?, signature = ? WHERE seq = ?",
        (0.1, public_openssh(other), sign(other, forged.signed_payload()), seq),
    )
    _rehash(path)
    result = audit(run_dir)
    found = findings_of_kind(result, ["signature from another key"])
    assert len(found) == 1 and f"row seq {seq} " in found[0] and "client beta" in found[0]
    assert _exit_code(run_dir) == 1


def test_signature_from_another_key_under_the_trusted_signer(run_dir):
    """Same, but the row still names the client's key as signer: the signature itself does not verify."""
    path = run_dir / "ledger.sqlite"
    seq = _seq_of(path, "gamma", 3)
    row = next(e for e in _rows(path) if e.seq == seq)
    other = ec.generate_private_key(ec.SECP384R1())
    _raw(path).execute("UPDATE entries SET signature = ? WHERE seq = ?", (sign(other, row.signed_payload()), seq))
    _rehash(path)
    result = audit(run_dir)
    found = findings_of_kind(result, ["signature from another key"])
    assert len(found) == 1 and f"row seq {seq} " in found[0] and "gamma" in found[0]


def test_budget_raised_after_the_fact(run_dir):
    """Edit beta's budget in every coordinator row and in config.toml, and re-hash: still caught."""
    path = run_dir / "ledger.sqlite"
    _raw(path).execute("UPDATE entries SET budget_epsilon = 20.0 WHERE client_id = 'beta'")
    _rehash(path)
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    for c in cfg["clients"]:
        if c["id"] == "beta":
            c["epsilon"] = 20.0
    (run_dir / "config.toml").write_text(tomli_w.dumps(cfg))
    result = audit(run_dir)
    raised = findings_of_kind(result, ["budget raised"])
    assert any("client beta" in f and "own ledger budget 8" in f for f in raised)
    assert "config edited" in _kinds(result)
    assert not next(c for c in result.clients if c.client == "beta").ok
    assert next(c for c in result.clients if c.client == "beta").budget == 8.0  # held to the strictest
    assert _exit_code(run_dir) == 1


def test_budget_raised_midway(run_dir):
    path = run_dir / "ledger.sqlite"
    _raw(path).execute("UPDATE entries SET budget_epsilon = 12.0 WHERE client_id = 'alpha' AND round >= 2")
    result = audit(run_dir)
    assert any("alpha's budget_epsilon changes from 8" in f for f in findings_of_kind(result, ["budget raised"]))


def test_budget_overrun_caught(tmp_path):
    """A run whose records are consistent and signed, but whose spend went past the budget."""
    budget = 0.9  # MECH costs ~0.77 for one round, ~1.0 for three
    run = write_run(tmp_path / "run", budget=budget)
    result = audit(run)
    exceeded = findings_of_kind(result, ["budget exceeded"])
    assert {f.split("client ")[1].split()[0] for f in exceeded} == set(CLIENTS)
    assert all(f"> budget {budget:g}" in f for f in exceeded)
    assert _kinds(result) == {"budget exceeded"}  # nothing was tampered with
    assert _exit_code(run) == 1


def test_consistent_under_reporting_is_an_epsilon_mismatch(tmp_path):
    """A client that under-reports epsilon everywhere (own ledger, signature) is still recomputed."""
    run = write_run(tmp_path / "run", epsilon_scale=0.5, rounds=2)
    result = audit(run)
    assert _kinds(result) == {"epsilon mismatch"}
    assert any("client alpha" in f and "dp-accounting PLD" in f for f in result.findings)


def test_config_that_no_longer_parses_is_a_finding_not_a_crash(run_dir):
    """config.toml replaced by something that is not a configuration: the audit still runs, names the file,
    and checks budgets against the ledgers."""
    (run_dir / "config.toml").write_text("privacy = [unclosed\n")
    result = audit(run_dir)
    edited = findings_of_kind(result, ["config edited"])
    assert any("matches no row's config_hash" in f for f in edited)
    assert any("does not read as a configuration" in f for f in edited)
    assert all(c.budget == 8.0 for c in result.clients)  # from the ledgers
    assert _exit_code(run_dir) == 1


# ---------------------------------------------------------------------------------------------- withheld records


def _withhold(run: Path, client: str, *names: str) -> None:
    for name in names:
        for f in (run / "clients" / client).glob(f"{name}*"):
            f.unlink()


def test_withheld_client_ledger_is_unverified_not_clean(run_dir, capsys):
    """Nothing inconsistent, but beta's own ledger is missing: the run is unverified (exit 3), never clean."""
    _withhold(run_dir, "beta", "ledger.sqlite")
    result = audit(run_dir)
    assert result.findings == [] and result.status == "unverified" and not result.ok
    assert result.unverified == ["beta"] and len(result.gaps) == 1 and "beta" in result.gaps[0]
    assert result.verdict() == (
        "unverified: no own ledger or no key from client(s) beta; the coordinator's record of them could not be checked"
    )
    assert [c.ok for c in result.clients] == [True, False, True]
    assert _exit_code(run_dir) == 3
    assert "verdict: unverified" in capsys.readouterr().out
    assert _exit_code(run_dir, "--json") == 3
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "unverified" and data["ok"] is False and data["unverified"] == ["beta"]


def test_withheld_key_is_unverified(run_dir):
    """Without the key the client registered, its signed rows prove nothing: unverified, not a finding."""
    _withhold(run_dir, "gamma", "node_key")
    result = audit(run_dir)
    assert result.findings == [] and result.unverified == ["gamma"]
    assert "no trusted key" in result.gaps[0] and "3 signed row(s)" in result.gaps[0]


def test_findings_outrank_unverified(run_dir):
    """A finding is evidence: exit 1, and the verdict still names the clients that could not be checked."""
    _withhold(run_dir, "alpha", "ledger.sqlite")
    _raw(run_dir / "ledger.sqlite").execute("UPDATE entries SET epsilon = 0.5 WHERE seq = 2")
    result = audit(run_dir)
    assert result.status == "violations" and result.unverified == ["alpha"]
    assert result.verdict().endswith("(also unverified: no own ledger or no key from client(s) alpha)")
    assert _exit_code(run_dir) == 1


def test_configured_client_without_rows_or_ledger_is_unverified(tmp_path):
    """config.toml lists delta; no ledger has a row of it and it handed nothing over: left out, or never
    sampled? Only its own ledger could say."""
    # num_clients 4: config.toml is read as the run reads it, which keeps only num_clients [[clients]] entries.
    extra = {"num_clients": 4, "clients": [{"id": c} for c in (*CLIENTS, "delta")]}
    run = write_run(tmp_path / "run", rounds=1, config_extra=extra)
    result = audit(run)
    assert result.findings == [] and result.unverified == ["delta"]
    assert "never sampled, or left out" in result.gaps[0]
    (run / "clients" / "delta").mkdir()
    Ledger(run / "clients" / "delta" / "ledger.sqlite").close()  # an empty ledger: it never trained
    load_or_create_key(run / "clients" / "delta" / "node_key")
    result = audit(run)
    assert result.ok, result.to_dict()
    assert next(c for c in result.clients if c.client == "delta").rounds_trained == 0


def test_non_private_run_needs_no_client_ledgers(tmp_path):
    """A non-private run spends nothing to check (epsilon is infinite): its clients keep no ledger."""
    run = write_run(tmp_path / "run", dp=False, rounds=1)
    assert not list(run.glob("clients/*/ledger.sqlite"))
    assert audit(run).status == "clean"
    _withhold(run, "alpha", "node_key")  # but its rows are signed: without the key they prove nothing
    assert audit(run).unverified == ["alpha"]


def _cut_tail(path: Path, from_round: int) -> None:
    """A careful coordinator: drop the last round(s) and rebuild the chain, so the ledger looks whole."""
    kept = [e for e in _rows(path) if e.round < from_round]
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    with Ledger(path) as ledger:
        for e in kept:
            ledger.append(replace(e, prev_hash="", hash="", seq=0))


def test_cut_tail_reports_the_clients_own_epsilon(run_dir):
    """Rounds 2 and 3 cut and the chain rebuilt: each client's own ledger names the rounds, and the epsilon the
    audit reports is the client's three-round spend, not the one round the coordinator's ledger still shows."""
    _cut_tail(run_dir / "ledger.sqlite", 2)
    (run_dir / "metrics.json").unlink()  # its rounds would give the cut away too; the client ledgers suffice
    result = audit(run_dir)
    assert result.status == "violations" and result.unverified == []
    for c in CLIENTS:
        assert any(f"{c}'s trained round 2 " in f for f in findings_of_kind(result, ["row deleted"]))
        assert any(f"{c}'s trained round 3 " in f for f in findings_of_kind(result, ["row deleted"]))
    true_eps = rounds_epsilon("prv", 3, 1e-5)
    for c in result.clients:
        assert c.reported_epsilon == true_eps and c.rounds_trained == 3 and not c.ok
        assert math.isclose(c.recomputed_epsilon, true_eps, rel_tol=1e-9)
        assert math.isclose(c.dp_accounting_epsilon, true_eps, rel_tol=0.05)
    assert any("alpha" in n and "the audit reports the client's" in n for n in result.notes)


def test_cut_refused_round_is_caught(tmp_path):
    run = write_run(tmp_path / "run", refuse_from={"gamma": 3})
    path = run / "ledger.sqlite"
    seq = next(e.seq for e in _rows(path) if e.client_id == "gamma" and e.status == "refused")
    _raw(path).execute("DELETE FROM entries WHERE seq = ?", (seq,))
    _rehash(path)
    deleted = findings_of_kind(audit(run), ["row deleted"])
    assert any("gamma's refused round 3" in f for f in deleted)


def test_unfinished_last_reservation_counts_without_a_finding(run_dir):
    """Honest: alpha reserved round 4 and vanished before answering; the coordinator has no row. The spend
    counts (the audit reports it), but it is not a cut: a reservation may honestly have no outcome."""
    eps = rounds_epsilon("prv", 4, 1e-5)
    common = {"run_id": RUN_ID, "round": 4, "client_id": "alpha", "mechanism": MECH, "delta": 1e-5}
    with Ledger(run_dir / "clients" / "alpha" / "ledger.sqlite") as own:
        own.append(make_entry(**common, status="reserved", accountant="prv", epsilon=eps, budget_epsilon=8.0))
    result = audit(run_dir)
    assert result.findings == [] and result.ok
    alpha = result.clients[0]
    assert alpha.reported_epsilon == eps and alpha.rounds_trained == 3
    assert math.isclose(alpha.recomputed_epsilon, eps, rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------- many registered clients


def test_thousands_of_never_sampled_clients_are_one_gap_line(tmp_path, capsys):
    """2,000 clients registered, 3 sampled: the run stays unverified and `unverified` names all 1,997 others
    (only a client's own ledger could prove it never trained), but the output counts them in one line."""
    run = write_run(tmp_path / "run", rounds=1, config_extra={"num_clients": 2000})
    never = [f"client-{i}" for i in range(1997)]
    result = audit(run)
    assert result.findings == [] and result.status == "unverified" and result.exit_status == 3
    assert result.unverified == never and [c.client for c in result.clients] == list(CLIENTS)
    assert all(c.ok for c in result.clients)  # the three that took part check out
    assert result.gaps == [
        f"1997 clients (config.toml) have no rows in any ledger and no own ledger under {run / 'clients'}:"
        " never sampled, or left out (client-0, client-1, client-2, client-3, client-4 and 1992 more)"
    ]
    assert result.verdict() == (
        "unverified: no own ledger or no key from client(s) client-0, client-1, client-2, client-3, client-4 and"
        " 1992 more; the coordinator's record of them could not be checked"
    )
    assert _exit_code(run) == 3
    out = capsys.readouterr().out
    assert out.count("UNVERIFIED:") == 1 and "1997 clients (config.toml)" in out
    assert "client-5" not in out and "client-1996" not in out and len(out.splitlines()) < 40
    assert _exit_code(run, "--json") == 3
    data = json.loads(capsys.readouterr().out)
    assert data["unverified"] == never and len(data["gaps"]) == 1


def test_few_never_sampled_clients_keep_a_line_each(tmp_path):
    """Up to five, each still gets its own line (the wording tests and readers know)."""
    extra = {"num_clients": 8, "clients": [{"id": c} for c in CLIENTS]}
    result = audit(write_run(tmp_path / "run", rounds=1, config_extra=extra))
    assert result.unverified == [f"client-{i}" for i in range(5)] and len(result.gaps) == 5
    assert result.gaps[4] == (
        f"client client-4 (config.toml) has no rows in any ledger and no own ledger at"
        f" {tmp_path / 'run' / 'clients' / 'client-4'}: never sampled, or left out"
    )


def test_non_private_run_with_thousands_of_never_sampled_clients_is_one_note(tmp_path):
    """A non-private run spends nothing to check: the never-sampled clients are a note, and one note."""
    result = audit(write_run(tmp_path / "run", dp=False, rounds=1, config_extra={"num_clients": 2000}))
    assert result.status == "clean" and result.unverified == [] and result.gaps == []
    assert [n for n in result.notes if "never sampled" in n] == [
        f"1997 clients (config.toml) have no rows in any ledger and no own ledger under {tmp_path / 'run' / 'clients'}:"
        " never sampled, or left out (client-0, client-1, client-2, client-3, client-4 and 1992 more)"
    ]
