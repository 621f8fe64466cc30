"""The threat model, played from the hostile side through the real code paths.

One test (at least) per finding of issue 10: a coordinator that ships its own code or settings, probes
evaluation, reads data-dependent values, unmasks a lone update, makes a client fail after it reserved
spend, an auditor handed partial files, and fault switches outside a test simulation. Each test fails on
the code before issue 10.
"""

from __future__ import annotations

# ------------------------------------------------------------------ finding 1: the node runs its own code
# (section owned by the node-runner work)
# A coordinator that submits "the same release" with one line of its own in fedllm/client.py: a line that
# would lift the node's budget and marks the disk when it runs. The node's runner (fedllm.node, as `fedllm
# client` starts it, with the trust policy of a real profile and the node's own bundle hash) receives the
# real bundle built from that copy; the Runtime API around it is replaced by a recorder, the node's
# installed ClientApp by a spy. The loopback twin, through a real SuperLink and SuperNode, is in
# tests/unit/test_node_runner.py; the deployed one, through `fedllm run`, in tests/system/test_deploy.py.

_F1_HOSTILE_LINE = (
    '\n__import__("pathlib").Path({marker!r}).write_text("coordinator code ran")'
    "  # ...and then: ClientBudget.check = lambda *a, **k: None\n"
)


def _f1_serve(monkeypatch, runner, fab_bytes: bytes, run_id: int):
    """One task through ``NodeRunner.serve_task``: the task input given, the reply and the status recorded."""
    import hashlib
    import time

    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.app import Context, Message, Metadata, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    import fedllm.node as node

    run = Run.create_empty(run_id)
    run.fab_id, run.fab_version = node.APP_ID, runner.policy.version
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    context = Context(run_id, 1, {"profile": str(runner.policy.profile)}, RecordDict(), {})
    sent = Metadata(run_id, "m" * 64, 0, 1, "", "", time.time(), 600.0, "train")  # as the SuperNode received it
    message = Message(RecordDict(), metadata=sent)
    pushed: dict = {}

    class Client:  # the SuperNode's Runtime API, as far as one task uses it
        def SendTaskHeartbeat(self, _request):
            from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

            return SendTaskHeartbeatResponse(success=True)

        def close(self):
            pass

    monkeypatch.setattr(node, "_runtime_client", lambda *a, **k: Client())
    monkeypatch.setattr(runtime, "pull_task_input", lambda _c: (message, context, run, fab))
    monkeypatch.setattr(runtime, "push_message", lambda _c, reply, _ctx: pushed.update(reply=reply))
    monkeypatch.setattr(runtime, "push_task_output", lambda _c, _ctx, status, details: pushed.update(status=status))
    runner.serve_task("token", f"task 1 of run {run_id}")
    return pushed


def test_f1_a_bundle_with_one_hostile_line_is_refused_before_anything_runs(tmp_path, monkeypatch, caplog):
    import sys

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import ErrorCode, SubStatus
    from support import node_profile, project_copy

    from fedllm.node import NodeRunner, TrustPolicy, own_bundle_hash
    from fedllm.profile import load_profile

    marker = tmp_path / "marker"
    site = tmp_path / "site"
    site.mkdir()
    profile = load_profile(node_profile(site))
    release = project_copy(tmp_path / "release")  # the node's installed tree (a snapshot: the tree may be edited)
    hostile = project_copy(
        tmp_path / "coordinator", {"fedllm/client.py": lambda s: s + _F1_HOSTILE_LINE.format(marker=str(marker))}
    )
    calls = []

    def installed_app(message, context):  # spies on the node's own ClientApp (fedllm.apps.client:app)
        from flwr.app import Message, RecordDict

        calls.append(context.run_id)
        return Message(RecordDict(), reply_to=message)

    policy = TrustPolicy.for_profile(profile, own_bundle_hash(release))
    runner = NodeRunner("127.0.0.1:1", policy, installed_app)

    with caplog.at_level("ERROR", logger="fedllm.node"):
        refused = _f1_serve(monkeypatch, runner, build_fab_from_disk(hostile), run_id=7)
    reason = refused["reply"].error.reason
    assert refused["reply"].error.code == ErrorCode.INVALID_FAB and refused["status"] == SubStatus.FAILED
    assert reason.startswith("node st-marys refuses run 7: bundle ") and str(profile.source) in reason
    assert "\n" not in reason and [r.getMessage() for r in caplog.records] == [reason]
    assert calls == []  # the node's app never ran: no profile data read, nothing trained
    assert not marker.exists()  # and the coordinator's client.py was never imported
    assert not [m for m in list(sys.modules.values()) if str(hostile) in str(getattr(m, "__file__", "") or "")]
    assert not (profile.state_dir / "ledger.sqlite").exists()

    # The same path with the node's own release goes through to the node's app.
    served = _f1_serve(monkeypatch, runner, build_fab_from_disk(release), run_id=8)
    assert not served["reply"].has_error() and served["status"] == SubStatus.COMPLETED and calls == [8]


# ------------------------------------------------------------------ findings 2-6, 8 (client side)

import pytest  # noqa: E402


# Finding 2: the run config switched DP off (and moved every other privacy knob) on a profile-bound node.
@pytest.mark.parametrize(
    ("key", "value", "node_value"),
    [
        ("privacy.enabled", False, "true"),
        ("training.local_steps", 50, "2"),
        ("training.batch_size", 120, "8"),
        ("privacy.max_grad_norm", 100.0, "1"),
        ("privacy.noise_multiplier", 0.01, "unset"),
        ("privacy.accountant", "rdp", "'pld'"),
        ("privacy.planned_rounds", 1, "2"),
        ("privacy.delta", 0.01, "1e-05"),
        ("share_client_metrics", True, "false"),
        ("federated_evaluation", True, "false"),
        ("secure_aggregation.enabled", False, "true"),
        ("secure_aggregation.min_peers", 0 + 1, None),  # equal to the node's: accepted (control)
    ],
)
def test_f2_a_run_config_cannot_set_any_privacy_setting_on_a_node(deployed_node, key, value, node_value):
    from fedllm.errors import ConfigError

    node = deployed_node()
    config = node.run_config(**{key: value})
    if node_value is None:
        assert node.client(config).privacy.min_secagg_peers == 1
        return
    with pytest.raises(ConfigError) as refused:
        node.client(config)
    line = str(refused.value)
    assert "\n" not in line and "refuses the run" in line and str(node.profile) in line
    shown = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else f"{value:g}"
    assert f"{key} = {shown} (this node: {node_value})" in line
    assert not node.ledger.exists(), "refused before the node's data is read or any spend is recorded"


def test_f2_a_setting_that_does_not_touch_privacy_follows_the_run(deployed_node):
    node = deployed_node()
    client = node.client(node.run_config(**{"training.learning_rate": 0.05}))
    assert client.config.training.learning_rate == 0.05 and client.privacy.epsilon == 3.0


# Finding 3: evaluation answered any model, any time, with the opt-in off.
def _initial(client):
    """A global model as the coordinator would send it: the untrained trainable tensors."""
    from fedllm.model import build_model, get_trainable

    return get_trainable(build_model(client.config.model, client.assets.num_labels))


def test_f3_evaluation_is_refused_without_the_opt_in_and_for_any_model_but_the_rounds(deployed_node):
    off = deployed_node()
    client = off.client()
    probe = _initial(client)
    with pytest.raises(PermissionError, match="federated evaluation is off"):
        client.evaluate(probe, {"server-round": 1})

    on = deployed_node(privacy="federated_evaluation = true")
    client = on.client(on.run_config(federated_evaluation=True))
    global_model = _initial(client)
    with pytest.raises(PermissionError, match="not the one this node trained from"):
        client.evaluate(global_model, {"server-round": 1})  # nothing trained yet this round
    client.fit(global_model, {"server-round": 1})
    import numpy as np

    random_probe = [np.random.default_rng(1).normal(size=a.shape).astype(a.dtype) for a in global_model]
    with pytest.raises(PermissionError, match="not the one this node trained from"):
        client.evaluate(random_probe, {"server-round": 1})
    _loss, weight, metrics = client.evaluate(global_model, {"server-round": 1})
    assert weight == 1 and 0.0 <= metrics["accuracy"] <= 1.0  # the test split's size does not leave
    with pytest.raises(PermissionError, match="already answered"):
        client.evaluate(global_model, {"server-round": 1})


# Finding 4: the exact training-set size left as the FedAvg weight and moved the mechanism.
@pytest.mark.parametrize("masked", [False, True])
def test_f4_nothing_that_leaves_depends_on_the_true_row_count(deployed_node, masked):

    from fedllm.ledger import Ledger, entry_from_metrics
    from fedllm.secure_aggregation import Masking

    replies, mechanisms = [], []
    for rows in (40, 41):  # neighbouring data sets: one record more
        node = deployed_node(rows=rows, declared=36)
        client = node.client()
        assert len(client.assets.train) != 36 or rows == 40
        config = {"server-round": 1, **(Masking(1.0, 1000).to_config() if masked else {})}
        _, weight, metrics = client.fit(_initial(client), config)
        sent = entry_from_metrics(metrics)  # the signed row that leaves with the update
        replies.append((weight, sent.epsilon, sent.budget_epsilon, sent.mechanism))
        with Ledger(node.ledger) as ledger:
            mechanisms.append(ledger.entries(status="trained")[0].mechanism)
    assert replies[0] == replies[1] and replies[0][0] == 36  # the declared size, not 36 or 37 true rows
    assert mechanisms[0] == mechanisms[1] and mechanisms[0].sample_rate == pytest.approx(8 / 36)


# Finding 5: with one of two clients refusing, the unmasked "sum" was the other's update.
def test_f5_the_coordinator_never_applies_a_masked_sum_of_one_update(tmp_path, caplog):
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from support import make_strategy

    from fedllm.accounting import NO_RELEASE
    from fedllm.ledger import Ledger, entry_to_metrics, make_entry
    from fedllm.secure_aggregation import Masking

    reference = [np.zeros((2, 3), np.float32)]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        strategy = make_strategy(ledger, tmp_path, reference, min_clients=2, masking=Masking(1.0, 100))

        class Proxy:
            def __init__(self, cid):
                self.cid = cid

        def reply(cid, status, weight):
            entry = make_entry(
                run_id="r", round=1, client_id=cid, status=status, mechanism=NO_RELEASE, delta=1e-5,
                accountant="prv", epsilon=1.0, budget_epsilon=3.0, config_hash="c",
            )  # fmt: skip
            lone_update = ndarrays_to_parameters([np.full((2, 3), 0.7)])  # what SecAgg+ unmasked
            return Proxy(cid), FitRes(Status(Code.OK, ""), lone_update, weight, entry_to_metrics(entry))

        strategy._asked = ["1", "2"]
        strategy._global = reference
        from fedllm.metrics import RoundRecord

        strategy._current = RoundRecord(round=1)
        params, _ = strategy.aggregate_fit(1, [reply("a", "trained", 36), reply("b", "refused", 0)], [])
    assert params is None, "a masked sum with one non-zero contribution is that contribution: never applied"
    assert "only 1 non-zero contribution" in caplog.text


def test_f5_a_client_refuses_to_mask_with_fewer_peers_than_its_profile_demands(deployed_node, flower_task):
    from flwr.app import Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from fedllm.apps.client import app  # the node's installed ClientApp, with its SecAgg+ mod

    node = deployed_node(privacy="min_secagg_peers = 2")
    ctx = node.context(node.run_config(**{"secure_aggregation.min_peers": 2}))
    stage = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [b"x"], Key.SOURCE_LIST: [2]}
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(stage)}), dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(PermissionError, match=r"only 1 other client\(s\) took part in key sharing"):
        app(msg, ctx)
    assert not node.ledger.exists(), "refused before training: nothing spent"


def test_f5_a_client_will_not_unmask_a_node_listed_both_surviving_and_dropped(flower_task):
    from flwr.app import Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from fedllm.secure_aggregation import secagg_mod

    stage = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]}
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(stage)}), dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    answered = []
    with pytest.raises(PermissionError, match=r"node\(s\) \[3\] listed as both surviving and dropped"):
        secagg_mod(lambda _: True)(msg, ctx, lambda m, c: answered.append(m))
    assert answered == []


# Finding 6: the loader's rate differed from the planned one for some (n, B); the client raised after
# reserving, and no "failed" row was written.
def test_f6_the_rate_that_runs_is_the_rate_that_is_accounted_for_awkward_sizes(deployed_node):
    from fedllm.ledger import Ledger

    node = deployed_node(rows=104, declared=93, training="", privacy="")
    node.profile.write_text(node.profile.read_text().replace("batch_size = 8", "batch_size = 1"))
    client = node.client(node.run_config(**{"training.batch_size": 1}))
    for r in (1, 2):
        client.fit(_initial(client), {"server-round": r})
    with Ledger(node.ledger) as ledger:
        assert [e.status for e in ledger.entries()] == ["reserved", "trained"] * 2
        rates = {e.mechanism.sample_rate for e in ledger.entries()}
    assert rates == {1 / 93}


@pytest.mark.parametrize("failure", ["training raises", "rate differs"])
def test_f6_any_failure_after_a_reservation_leaves_a_failed_row_and_the_spend(deployed_node, monkeypatch, failure):
    from dataclasses import replace

    import fedllm.client as client_module
    from fedllm.accounting import epsilon_of_mechanisms
    from fedllm.ledger import Ledger

    node = deployed_node()
    client = node.client()
    real = client_module.train_dp

    def broken(*args, **kwargs):
        if failure == "training raises":
            raise RuntimeError("out of memory (injected)")
        return replace(real(*args, **kwargs), sample_rate=0.5)

    monkeypatch.setattr(client_module, "train_dp", broken)
    with pytest.raises(RuntimeError):
        client.fit(_initial(client), {"server-round": 1})
    with Ledger(node.ledger) as ledger:
        rows = ledger.entries()
        assert [e.status for e in rows] == ["reserved", "failed"]
        spent = ledger.spent("st-marys")
    assert epsilon_of_mechanisms("prv", spent, 1e-5) > 0, "the reserved spend stays counted"


# Finding 8: FEDLLM_FAULT_NO_NOISE removed the noise on any node while the ledger recorded the plan.
def test_f8_fault_switches_refuse_to_start_a_deployed_node(deployed_node, monkeypatch, capsys):
    from fedllm import faults
    from fedllm.cli import main
    from fedllm.errors import ConfigError

    node = deployed_node()
    for name in faults.SWITCHES:
        monkeypatch.setenv(name, "1")
        monkeypatch.setenv(faults.TESTING, "1")  # even with the test markers, a deployed node refuses
        monkeypatch.setenv(faults.IN_SIMULATION, "1")
        with pytest.raises(ConfigError, match=f"{name} is set: fault switches .* refusing to start a deployed node"):
            node.client()
        # `fedllm client` refuses before it starts any Flower process (the address is never dialled)
        assert main(["client", "--profile", str(node.profile), "--superlink", "127.0.0.1:9"]) == 2
        assert f"{name} is set" in capsys.readouterr().err
        monkeypatch.delenv(name)
    assert not node.ledger.exists()


def test_f8_no_noise_outside_a_test_simulation_is_refused_not_applied(tiny_texts, tokenizer, monkeypatch):
    from fedllm import faults
    from fedllm.accounting import make_accountant
    from fedllm.cli import main
    from fedllm.config import ModelConfig
    from fedllm.errors import ConfigError
    from fedllm.model import build_model, pick_device
    from fedllm.training import DPSettings, TokenizedDataset, train_dp

    monkeypatch.setenv(faults.NO_NOISE, "1")
    monkeypatch.delenv(faults.TESTING, raising=False)
    monkeypatch.delenv(faults.IN_SIMULATION, raising=False)
    model = build_model(ModelConfig(name="tiny-bert"), 2)
    with pytest.raises(ConfigError, match="FEDLLM_FAULT_NO_NOISE is set outside a test simulation"):
        train_dp(
            model, TokenizedDataset(tiny_texts, tokenizer, 32), steps=1, batch_size=16, learning_rate=1e-2,
            dp=DPSettings(1.0, 1.0, "lora"), accountant=make_accountant("prv"), device=pick_device("cpu"),
        )  # fmt: skip
    assert main(["simulate", "tiny", "--quiet", "--rounds", "1"]) == 2  # refused before anything starts


# ------------------------------------------------------------------ finding 7: audit verdicts
# A coordinator that hands the auditor a run directory with its own ledger cut and the clients' ledgers left
# out. The run is a real `fedllm simulate` of simulations/tiny.toml (3 clients, 2 rounds, signed rows, each
# client's own ledger and key under DIR/clients/<id>/), tampered with as a careful coordinator would: the
# rows of round 2 go, and so does every other trace of them (metrics.json's round 2, SQLite's AUTOINCREMENT
# mark), so that only the clients' own ledgers still know that round 2 was trained. The run comes from the
# `simulated_tiny_run` fixture (tests/conftest.py); `tiny_run_copy` is a fresh copy per test.


def _f7_withhold_client_ledgers(run):
    """What the coordinator leaves out: every client's own ledger (the keys stay, as registered)."""
    for own in sorted(run.glob("clients/*/ledger.sqlite*")):
        own.unlink()


def _f7_cut_round(run, cut: int, *, rebuild: bool) -> None:
    """Remove round ``cut`` from the coordinator's ledger and from metrics.json.

    ``rebuild=False`` deletes the rows in SQLite (triggers dropped) and resets the AUTOINCREMENT mark, so no
    hole shows; ``rebuild=True`` writes a fresh ledger through the ledger module from the rows kept, so the
    hash chain is whole and every kept row still carries its client's valid signature.
    """
    import dataclasses
    import sqlite3

    from fedllm import metrics as run_metrics
    from fedllm.ledger import Ledger, read_entries

    path = run / "ledger.sqlite"
    if rebuild:
        kept = [e for e in read_entries(path) if e.round != cut]
        for f in run.glob("ledger.sqlite*"):
            f.unlink()
        with Ledger(path) as ledger:
            for e in kept:
                ledger.append(dataclasses.replace(e, prev_hash="", hash="", seq=0))
    else:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("DROP TRIGGER IF EXISTS entries_no_delete")
        conn.execute("DELETE FROM entries WHERE round = ?", (cut,))
        conn.execute("UPDATE sqlite_sequence SET seq = (SELECT MAX(seq) FROM entries) WHERE name = 'entries'")
        conn.close()
    m = run_metrics.read(run / "metrics.json")
    m.rounds = [r for r in m.rounds if r.round != cut]
    run_metrics.write(m, run / "metrics.json")


def _f7_own_final(run, client: str) -> float:
    from fedllm.ledger import read_entries

    return [e.epsilon for e in read_entries(run / "clients" / client / "ledger.sqlite") if e.status == "trained"][-1]


def test_f7_withheld_client_ledgers_make_the_audit_unverified(tiny_run_copy, capsys):
    """All client ledgers removed: whatever the coordinator's ledger says, it is not "clean"."""
    import json

    from fedllm.audit.verify import audit
    from fedllm.cli import main

    clients = sorted(p.name for p in (tiny_run_copy / "clients").iterdir())
    assert clients == ["client-0", "client-1", "client-2"]
    assert audit(tiny_run_copy).verdict().startswith("clean")  # the honest run, with everything handed over
    _f7_withhold_client_ledgers(tiny_run_copy)
    result = audit(tiny_run_copy)
    assert result.findings == []  # nothing the coordinator wrote is inconsistent...
    assert not result.ok and result.status == "unverified"  # ...but nothing vouches for it either
    assert result.verdict().startswith("unverified") and all(c in result.verdict() for c in clients)
    capsys.readouterr()
    assert main(["audit", str(tiny_run_copy)]) == 3
    printed = capsys.readouterr().out
    assert "clean" not in printed and "verdict: unverified" in printed
    assert all(c in printed for c in clients)
    assert main(["audit", str(tiny_run_copy), "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["status"] == "unverified"
    assert sorted(data["unverified"]) == clients


def test_f7_cut_round_with_withheld_ledgers_is_not_clean(tiny_run_copy, capsys):
    """The issue's exact case: round 2 cut (every trace of it), client ledgers removed."""
    from fedllm.cli import main

    _f7_cut_round(tiny_run_copy, 2, rebuild=True)
    _f7_withhold_client_ledgers(tiny_run_copy)
    capsys.readouterr()
    assert main(["audit", str(tiny_run_copy)]) != 0
    printed = capsys.readouterr().out
    assert "clean" not in printed and "unverified" in printed


def test_f7_one_withheld_ledger_is_named_and_the_report_says_unverified(tiny_run_copy):
    from fedllm.audit.verify import audit
    from fedllm.report.facts import build_report

    (tiny_run_copy / "clients" / "client-1" / "node_key.pub").unlink()  # a ledger without its key proves nothing
    result = audit(tiny_run_copy)
    assert result.findings == []  # a missing key is no evidence of tampering...
    assert result.status == "unverified" and result.unverified == ["client-1"]  # ...nor of anything else
    assert next(c for c in result.clients if c.client == "client-1").ok is False
    assert all(c.ok for c in result.clients if c.client != "client-1")
    summary = build_report(tiny_run_copy)["audit"]
    assert summary["ok"] is False and summary["status"] == "unverified"
    assert summary["verdict"].startswith("unverified") and "client-1" in summary["verdict"]


def test_f7_cut_tail_rows_deleted_is_caught_by_the_client_ledgers(tiny_run_copy, capsys):
    """Round 2's rows deleted in SQLite (and the AUTOINCREMENT mark reset) with the client ledgers there."""
    _f7_check_cut_tail_caught(tiny_run_copy, capsys, rebuild=False)


def test_f7_cut_tail_rebuilt_chain_is_caught_by_the_client_ledgers(tiny_run_copy, capsys):
    """Round 2 left out of a coordinator ledger rebuilt through the ledger module: its chain verifies."""
    _f7_check_cut_tail_caught(tiny_run_copy, capsys, rebuild=True)


def _f7_check_cut_tail_caught(run, capsys, *, rebuild: bool) -> None:
    """Each client's own ledger names the cut round, and the epsilon the audit reports for the client is its
    own (higher) one, not the cut ledger's."""
    import json

    from fedllm.audit.verify import audit
    from fedllm.cli import main
    from fedllm.ledger import read_entries

    own_final = {c: _f7_own_final(run, c) for c in ("client-0", "client-1", "client-2")}
    _f7_cut_round(run, 2, rebuild=rebuild)
    coord = read_entries(run / "ledger.sqlite")
    assert {e.round for e in coord} == {1}
    if rebuild:
        from fedllm.ledger import Ledger

        with Ledger(run / "ledger.sqlite") as ledger:
            assert ledger.verify_chain() == []  # the chain looks intact
    cut_claim = {e.client_id: e.epsilon for e in coord if e.status == "trained"}
    assert all(cut_claim[c] < own_final[c] for c in own_final)  # what the cut ledger would have reported
    result = audit(run)
    for client, true_eps in own_final.items():
        named = [f for f in result.findings if client in f and "round 2" in f]
        assert named and any(f.startswith("row deleted") for f in named), result.findings
        audited = next(c for c in result.clients if c.client == client)
        assert audited.reported_epsilon >= true_eps and audited.recomputed_epsilon >= true_eps * (1 - 1e-6)
        assert audited.rounds_trained == 2 and not audited.ok
    assert result.status == "violations" and not result.ok
    capsys.readouterr()
    assert main(["audit", str(run), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {c["client"]: c["reported_epsilon"] for c in data["clients"]} == own_final


def test_f7_cut_tail_is_caught_by_one_client_ledger(tiny_run_copy):
    """Only client-2 hands its ledger over: enough to catch the cut, and the others stay unverified."""
    from fedllm.audit.verify import audit

    true_eps = _f7_own_final(tiny_run_copy, "client-2")
    _f7_cut_round(tiny_run_copy, 2, rebuild=True)
    for client in ("client-0", "client-1"):
        for own in tiny_run_copy.glob(f"clients/{client}/ledger.sqlite*"):
            own.unlink()
    result = audit(tiny_run_copy)
    assert any(f.startswith("row deleted") and "client-2" in f and "round 2" in f for f in result.findings)
    assert next(c for c in result.clients if c.client == "client-2").reported_epsilon >= true_eps
    assert result.status == "violations" and sorted(result.unverified) == ["client-0", "client-1"]
    assert "unverified" in result.verdict()
