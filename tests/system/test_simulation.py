"""End to end through Flower's simulation engine: budgets, ledger and metrics agree with the accountant."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from fedllm import metrics as run_metrics
from fedllm.accounting import epsilon_of_mechanisms, history_of, make_accountant
from fedllm.cli import main
from fedllm.config import from_dict
from fedllm.ledger import Ledger


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """3 clients x 3 rounds on tiny-bert; one client's budget covers exactly 2 rounds."""
    out = tmp_path_factory.mktemp("sim") / "run"
    scenario = out.parent / "scenario.toml"
    base = Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml"
    scenario.write_text(
        base.read_text().replace("rounds = 2", "rounds = 3\nfederated_evaluation = true")
        + '\n[[clients]]\nid = "alpha"\n\n[[clients]]\nid = "beta"\nepsilon = 2.0\nplanned_rounds = 2\n'
        + '\n[[clients]]\nid = "gamma"\nepsilon = 4.0\n'
    )
    assert main(["simulate", str(scenario), "--quiet", "--out", str(out)]) == 0
    return out


def test_outputs_exist_and_config_is_resolved(tiny_run):
    assert {"config.toml", "metrics.json", "ledger.sqlite"} <= {p.name for p in tiny_run.iterdir()}
    metrics = run_metrics.read(tiny_run / "metrics.json")
    assert metrics.dp and metrics.rounds_planned == 3 and len(metrics.rounds) == 3
    resolved = from_dict(tomllib.loads((tiny_run / "config.toml").read_text()))
    assert resolved.client_ids == ["alpha", "beta", "gamma"]
    assert resolved.client_settings("beta").epsilon == 2.0 and resolved.client_settings("beta").planned_rounds == 2


def test_federated_evaluation_is_recorded_when_opted_in(tiny_run):
    m = run_metrics.read(tiny_run / "metrics.json")
    for r in m.rounds:
        assert r.federated_accuracy is not None and 0.0 <= r.federated_accuracy <= 1.0
        accs = [c.test_accuracy for c in r.clients.values() if c.status == "trained"]
        assert accs and all(a is not None for a in accs)


def test_reported_epsilon_equals_a_fresh_accountant_over_the_recorded_history(tiny_run):
    """Claim 1. A client whose accountant were reset each round would report a constant epsilon: caught."""
    with Ledger(tiny_run / "ledger.sqlite") as ledger:
        for client in ("alpha", "gamma"):
            rows = [e for e in ledger.entries(client_id=client) if e.status == "trained"]
            assert [e.round for e in rows] == [1, 2, 3]
            for i, row in enumerate(rows):
                recomputed = epsilon_of_mechanisms(row.accountant, [r.mechanism for r in rows[: i + 1]], row.delta)
                assert row.epsilon == pytest.approx(recomputed, rel=1e-6)
            eps = [r.epsilon for r in rows]
            assert eps[0] < eps[1] < eps[2] <= rows[0].budget_epsilon
            # and the metrics file reports the same numbers
            m = run_metrics.read(tiny_run / "metrics.json")
            assert [r.clients[client].epsilon for r in m.rounds] == pytest.approx(eps, rel=1e-9)


def test_fresh_opacus_accountant_from_client_ledger_matches(tiny_run):
    """The client's own ledger is the history its accountant was rebuilt from each round."""
    with Ledger(tiny_run / "clients" / "alpha" / "ledger.sqlite") as ledger:
        spent = ledger.spent("alpha")
        final = [e for e in ledger.entries(status="trained")][-1]
    fresh = make_accountant(final.accountant, history_of(spent))  # the run's own accountant kind (pld by default)
    extra = {"eps_error": 0.01} if final.accountant == "prv" else {}
    assert fresh.get_epsilon(delta=final.delta, **extra) == pytest.approx(final.epsilon, rel=1e-6)


def test_budget_for_two_rounds_refuses_the_third(tiny_run):
    """Claim 2: trains k=2 rounds, refuses round 3, never passes its budget; ledger and metrics say so."""
    with Ledger(tiny_run / "ledger.sqlite") as ledger:
        rows = ledger.entries(client_id="beta")
    assert [(e.round, e.status) for e in rows] == [(1, "trained"), (2, "trained"), (3, "refused")]
    assert rows[1].epsilon <= 2.0 and rows[2].steps == 0
    assert rows[2].epsilon == pytest.approx(rows[1].epsilon)
    m = run_metrics.read(tiny_run / "metrics.json")
    assert m.rounds[2].clients["beta"].status == "refused"
    assert m.rounds[2].aggregated == 2
    with Ledger(tiny_run / "clients" / "beta" / "ledger.sqlite") as own:
        assert [e.status for e in own.entries()][-1] == "refused"
        assert len(own.spent("beta")) == 2


def test_ledger_chain_is_intact_and_metrics_json_is_strict(tiny_run):
    with Ledger(tiny_run / "ledger.sqlite") as ledger:
        assert ledger.verify_chain() == []
    json.loads((tiny_run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_run_stops_cleanly_when_too_few_clients_remain(tmp_path):
    scenario = tmp_path / "s.toml"
    base = Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml"
    scenario.write_text(
        base.read_text()
        .replace("rounds = 2", "rounds = 4")
        .replace("num_clients = 3", "num_clients = 2")
        .replace("min_clients = 1", "min_clients = 2")
        + '\n[[clients]]\nid = "a"\nplanned_rounds = 1\n\n[[clients]]\nid = "b"\n'
    )
    out = tmp_path / "run"
    assert main(["simulate", str(scenario), "--quiet", "--out", str(out)]) == 0
    m = run_metrics.read(out / "metrics.json")
    assert [r.round for r in m.rounds] == [1, 2]
    assert m.rounds[1].clients["a"].status == "refused"
    assert m.stopped_early and "round 3" in m.stopped_early
    assert {"report.html", "report.md", "report.json"} <= {p.name for p in out.iterdir()}  # also when stopped early


def test_no_dp_baseline_is_labelled(tmp_path):
    out = tmp_path / "run"
    assert main(["simulate", "tiny", "--quiet", "--no-dp", "--rounds", "1", "--out", str(out)]) == 0
    m = run_metrics.read(out / "metrics.json")
    assert not m.dp
    assert m.rounds[0].federated_accuracy is None  # off unless the scenario opts in
    assert all(c.epsilon is None for c in m.rounds[0].clients.values())
    with Ledger(out / "ledger.sqlite") as ledger:
        assert {e.accountant for e in ledger.entries()} == {"none"}
        assert all(math.isinf(e.epsilon) for e in ledger.entries())


def test_node_keys_are_private_and_never_leak_into_records(tiny_run):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    keys = sorted(tiny_run.glob("clients/*/node_key"))
    assert [k.parent.name for k in keys] == ["alpha", "beta", "gamma"]
    records = [p for p in tiny_run.rglob("*") if p.is_file() and p.name != "node_key"]
    assert any(p.name == "report.html" for p in records) and any(p.name == "ledger.sqlite" for p in records)
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600
        scalar = load_ssh_private_key(key.read_bytes(), password=None).private_numbers().private_value
        secrets = [scalar.to_bytes(48, "big"), f"{scalar:x}".encode(), str(scalar).encode()]
        for path in records:
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), f"private key material in {path}"


def test_simulate_leaves_no_process_running(tiny_run):
    import time

    import psutil

    deadline = time.monotonic() + 20
    while (left := [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert not left, [p.cmdline()[:3] for p in left]


def test_secure_aggregation_is_on_and_per_client_loss_stays_on_the_node(tiny_run):
    """Default: SecAgg+ masks every update; a refusing client adds a zero of weight 0; no loss in clear."""
    cfg = from_dict(tomllib.loads((tiny_run / "config.toml").read_text()))
    assert cfg.secure_aggregation.enabled and not cfg.share_client_metrics
    m = run_metrics.read(tiny_run / "metrics.json")
    assert [r.aggregated for r in m.rounds] == [3, 3, 2]  # beta refused round 3, inside the masked sum
    assert all(c.loss is None for r in m.rounds for c in r.clients.values())
    assert len({r.loss for r in m.rounds} | {m.initial_loss}) == 4  # the masked mean moved the model each round
