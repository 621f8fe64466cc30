"""The node's own runner: which runs a deployed node takes part in, and that a bundle's code never runs there.

The unit tests pin the trust decision. The loopback test puts the runner behind a real SuperLink and a real
``flower-supernode --isolation process`` and submits, with ``flwr run``, a bundle built from a modified copy
of this project whose ClientApp writes a marker file when imported: refused while unknown, answered by the
node's own app once allowed, and its marker never written on either run.

``project_copy``, ``bundle_hash`` and ``node_profile`` live in ``tests/support.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from support import ROOT, bundle_hash, node_profile, project_copy

import fedllm
from fedllm.deploy import stop_tree, write_connection
from fedllm.node import APP_ID, NodeRunner, TrustPolicy, own_bundle_hash

# ---------------------------------------------------------------------------------------------- the decision

OWN = "a" * 64
ALLOWED = "b" * 64
FOREIGN = "3fa2c1d9e0b1" + "c" * 52
PROFILE = Path("/etc/fedllm/st-marys.toml")


def _policy(**kw) -> TrustPolicy:
    return TrustPolicy(node="st-marys", profile=PROFILE, version="0.1.0", own_bundle=OWN, **kw)


def test_the_node_takes_part_in_its_own_bundle_and_in_allowed_ones_only():
    policy = _policy(allowed=frozenset({ALLOWED}))
    assert policy.refusal(7, APP_ID, "0.1.0", OWN) is None
    assert policy.refusal(7, APP_ID, "0.1.0", ALLOWED) is None
    assert policy.refusal(7, APP_ID, "0.1.0", FOREIGN) == (
        "node st-marys refuses run 7: bundle 3fa2c1d9e0b1 is not this node's fedllm 0.1.0 nor in allowed_bundles"
        " of /etc/fedllm/st-marys.toml"
    )
    # Without a project tree (fedllm installed from a wheel) only the profile's list counts.
    wheel = replace(policy, own_bundle=None)
    assert wheel.refusal(7, APP_ID, "0.1.0", ALLOWED) is None
    assert wheel.refusal(7, APP_ID, "0.1.0", OWN) is not None


def test_another_app_or_release_is_refused_even_with_a_trusted_hash():
    policy = _policy(allowed=frozenset({ALLOWED}))
    assert policy.refusal(3, "evil/fedllm", "0.1.0", OWN) == (
        "node st-marys refuses run 3: app evil/fedllm==0.1.0 is not this node's fedllm/fedllm==0.1.0"
    )
    assert policy.refusal(3, APP_ID, "0.2.0", ALLOWED) == (
        "node st-marys refuses run 3: app fedllm/fedllm==0.2.0 is not this node's fedllm/fedllm==0.1.0"
    )
    assert (
        policy.refusal(3, "", "", "") == "node st-marys refuses run 3: app ?==? is not this node's fedllm/fedllm==0.1.0"
    )


def test_the_profile_lists_the_bundles_its_node_allows(tmp_path):
    from fedllm.errors import ConfigError
    from fedllm.profile import load_profile

    profile = load_profile(node_profile(tmp_path, f'allowed_bundles = ["{ALLOWED.upper()}"]\n'))
    policy = TrustPolicy.for_profile(profile, OWN)
    assert (policy.node, policy.profile, policy.allowed) == ("st-marys", profile.source, frozenset({ALLOWED}))
    assert policy.refusal(1, APP_ID, fedllm.__version__, ALLOWED) is None
    assert TrustPolicy.for_profile(load_profile(node_profile(tmp_path, "")), OWN).allowed == frozenset()
    with pytest.raises(ConfigError, match=r"node\.allowed_bundles"):
        load_profile(node_profile(tmp_path, 'allowed_bundles = ["3fa2c1d9e0b1"]\n'))  # a prefix is not a hash


def test_the_app_id_and_version_checked_are_what_flwr_run_sets():
    from flwr.common.config import get_metadata_from_config

    with (ROOT / "pyproject.toml").open("rb") as fh:
        assert get_metadata_from_config(tomllib.load(fh)) == (APP_ID, fedllm.__version__)
    assert TrustPolicy(node="x", profile=PROFILE).version == fedllm.__version__


def test_the_own_bundle_is_what_flwr_run_would_send_and_one_changed_line_changes_it(tmp_path):
    same = project_copy(tmp_path / "same")
    changed = project_copy(tmp_path / "changed", {"fedllm/client.py": lambda s: s + "\n# one more line\n"})
    own = own_bundle_hash(ROOT)
    assert own is not None and re.fullmatch("[0-9a-f]{64}", own)
    assert bundle_hash(same) == own  # reproducible: a copy of the same tree bundles to the same bytes
    assert bundle_hash(changed) != own
    assert own_bundle_hash(tmp_path) is None  # no pyproject.toml: nothing to build (a wheel install)


# ---------------------------------------------------------------------------------------------- loopback

TOY_SERVER = '''"""The coordinator's side of the loopback test: ask every node once, write down what came back."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes, deadline = [], time.monotonic() + 60
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    asks = [Message(RecordDict({"ask": ConfigRecord({"n": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    out = []
    for reply in grid.send_and_receive(asks, timeout=60):
        if reply.has_error():
            out.append({"code": reply.error.code, "reason": reply.error.reason})
        else:
            out.append({"content": dict(reply.content["answer"])})
    (Path(str(context.run_config["out-dir"])) / "replies.json").write_text(json.dumps(out))
'''

MARKED_CLIENT = '''"""The bundle's ClientApp: it marks the node's disk when imported, and when it answers."""
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("the bundle's fedllm/apps/client.py was imported on the node")
app = ClientApp()


@app.query()
def answer(message, context):
    Path({marker!r}).write_text("the bundle's ClientApp answered")
    return Message(RecordDict({{"answer": ConfigRecord({{"served-by": "bundle"}})}}), reply_to=message)
'''


def _node_app():
    """Stands in for the node's installed ClientApp: whatever answers is the node's code, not the bundle's."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def answer(message, context):
        return Message(RecordDict({"answer": ConfigRecord({"served-by": "node"})}), reply_to=message)

    return app


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"nothing on port {port} after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def loopback(tmp_path) -> Iterator[dict]:
    """An insecure SuperLink, one SuperNode in process isolation (SuperExec auth on) and the runner, on loopback."""
    bindir = Path(sys.executable).parent
    link_port, runtime_port = _free_port(), _free_port()
    secret_file = tmp_path / "superexec.secret"
    secret_file.write_bytes(os.urandom(32))
    node_home = tmp_path / "node-home"
    procs: list[subprocess.Popen] = []
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=_flower_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return proc

    link_cmd = [str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)]
    link = start("superlink", [*link_cmd, "--disable-runtime-dependency-installation"], tmp_path / "link-home")
    runner = None
    try:
        _wait_port(link_port, link, logs["superlink"])
        node_cmd = [str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}"]
        node_cmd += ["--isolation", "process", "--port", str(runtime_port)]
        node = start("supernode", [*node_cmd, "--superexec-auth-secret-file", str(secret_file)], node_home)
        _wait_port(runtime_port, node, logs["supernode"])
        policy = TrustPolicy(node="test-node", profile=tmp_path / "profile.toml", own_bundle=None)
        runner = NodeRunner(f"127.0.0.1:{runtime_port}", policy, _node_app(), secret_file.read_bytes())
        runner.start()
        yield {"runner": runner, "link_port": link_port, "runtime_port": runtime_port, "node_home": node_home}
    finally:
        if runner is not None:
            runner.stop()
        for proc in reversed(procs):
            stop_tree(proc)


def _submit(tree: Path, out: Path, link_port: int, home: Path) -> list[dict]:
    """``flwr run TREE`` as a coordinator would, then the replies the toy ServerApp wrote down."""
    env = _flower_env(home)
    write_connection(home, f"127.0.0.1:{link_port}", None)
    out.mkdir(parents=True)
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(tree), "fedllm", "--run-config", f"out-dir='{out}'"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline = time.monotonic() + 120
    while not (out / "replies.json").exists():
        assert time.monotonic() < deadline, "the ServerApp wrote no replies"
        time.sleep(0.5)
    return json.loads((out / "replies.json").read_text())


def test_a_bundle_the_node_does_not_trust_is_refused_and_an_allowed_one_is_answered_by_the_nodes_code(
    loopback, tmp_path
):
    started = time.monotonic()
    marker = tmp_path / "bundle-code-ran"
    bundle = project_copy(
        tmp_path / "coordinator-copy",
        {
            "fedllm/apps/server.py": lambda _: TOY_SERVER,
            "fedllm/apps/client.py": lambda _: MARKED_CLIENT.format(marker=str(marker)),
        },
    )
    digest = bundle_hash(bundle)
    runner: NodeRunner = loopback["runner"]

    refused = _submit(bundle, tmp_path / "run-1", loopback["link_port"], tmp_path / "coordinator-home")
    assert len(refused) == 1 and refused[0]["code"] == 7, refused  # ErrorCode.INVALID_FAB
    assert re.fullmatch(
        rf"node test-node refuses run \d+: bundle {digest[:12]} is not this node's fedllm {fedllm.__version__}"
        rf" nor in allowed_bundles of {re.escape(str(tmp_path / 'profile.toml'))}",
        refused[0]["reason"],
    ), refused
    assert (runner.refused, runner.served) == (1, 0)

    runner.policy = replace(runner.policy, allowed=frozenset({digest}))
    answered = _submit(bundle, tmp_path / "run-2", loopback["link_port"], tmp_path / "coordinator-home")
    assert answered == [{"content": {"served-by": "node"}}]  # the node's own app answered, not the bundle's
    assert (runner.refused, runner.served) == (1, 1)

    assert not marker.exists(), marker.read_text()  # the bundle's ClientApp was never imported on the node
    assert not (loopback["node_home"] / "apps").exists()  # nor installed: Flower installs FABs under apps/
    # Only the runner holds the SuperExec secret: nobody else can claim the node's tasks.
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from fedllm.node import _runtime_client

    intruder = _runtime_client(f"127.0.0.1:{loopback['runtime_port']}", [], retry=False, stop=runner.stopping)
    with pytest.raises(httpx.HTTPStatusError) as denied:
        intruder.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    intruder.close()
    assert denied.value.response.status_code == 401
    assert runner.is_alive() and runner.error is None
    print(f"\nloopback: two runs, {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------------------------------------- supervision


def test_a_runner_that_dies_stops_the_supernode_and_the_secret_is_private(tmp_path):
    """``fedllm client`` never leaves a SuperNode connected with nobody to answer it."""
    import stat
    import threading

    import psutil

    from fedllm.deploy import supervise, write_secret

    class Dying(threading.Thread):
        error: BaseException | None = None

        def run(self):
            time.sleep(0.5)
            self.error = RuntimeError("lost")

        def stop(self):
            pass

    seen = []
    started = time.monotonic()
    code = supervise(["sleep", "60"], dict(os.environ), lambda proc: seen.append(proc.pid), Dying())
    assert code == 1 and time.monotonic() - started < 20
    assert not psutil.pid_exists(seen[0]) or psutil.Process(seen[0]).status() == psutil.STATUS_ZOMBIE

    secret = write_secret(tmp_path / "s")
    assert len(secret) == 32 and (tmp_path / "s").read_bytes() == secret
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600
    assert write_secret(tmp_path / "s") != secret  # a fresh one each start
