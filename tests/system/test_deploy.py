"""Separate nodes for real: one SuperLink and three SuperNodes as separate processes, each in its own network
namespace (a bridge and veth pairs made here), with TLS, SuperNode authentication and the default config's
SecAgg+, started through ``fedllm server``, ``fedllm client`` and ``fedllm run`` exactly as an operator would.

Every process runs from one snapshot of this project tree (``tmp/release``): the release each host has
installed. A node trusts the bundle it would build from its own tree, so the snapshot keeps the nodes and the
coordinator on the same release even while the working tree is being edited. The hostile coordinator of
issue 10 is played twice: with a bundle of its own (one changed line in the client) and with a run config
that switches DP off. Every node refuses both, and the honest run afterwards trains on the same nodes.

Where network namespaces cannot be made (not root, no ``ip``), the same processes run on loopback ports.
Every test stops every process it started (by PID, whole trees), deletes its namespaces, and checks that
nothing it started is left running.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from support import project_copy

from fedllm.audit.verify import audit
from fedllm.certs import ConsortiumPaths, make_consortium
from fedllm.ledger import Ledger
from fedllm.metrics import read as read_metrics
from fedllm.report.write import write_reports

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("finance", "health", "sports", "weather")
KEYWORDS = {
    "finance": ("bank", "loan", "interest", "market", "stock", "credit"),
    "health": ("doctor", "fever", "clinic", "vaccine", "nurse", "patient"),
    "sports": ("match", "goal", "team", "coach", "league", "player"),
    "weather": ("rain", "storm", "cloud", "forecast", "wind", "snow"),
}
BUDGETS = {"st-marys": 8.0, "city-general": 6.0, "northside": 4.0}
EXAMPLES = 120  # rows per institution's file, and the size each declares in its profile
SUBNET = "10.213.{}.{}"


# ---------------------------------------------------------------------------------------------- topology


def _run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _netns_usable() -> bool:
    if not shutil.which("ip") or os.geteuid() != 0:
        return False
    probe = f"fedllm-probe-{uuid.uuid4().hex[:6]}"
    try:
        _run_ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError):
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return True


@dataclass
class Topology:
    """Hosts by name -> (netns or None, address). The SuperLink host is ``link``; the rest are nodes."""

    hosts: dict[str, tuple[str | None, str]]
    namespaces: list[str] = field(default_factory=list)

    def prefix(self, host: str) -> list[str]:
        ns = self.hosts[host][0]
        return ["ip", "netns", "exec", ns] if ns else []

    def address(self, host: str) -> str:
        return self.hosts[host][1]

    def delete(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def make_topology(nodes: list[str]) -> Topology:
    """A bridge in the SuperLink's namespace, one veth pair per node namespace, a /24 between them."""
    if not _netns_usable():
        return Topology({name: (None, "127.0.0.1") for name in ["link", *nodes]})
    tag = uuid.uuid4().hex[:6]
    subnet = int(tag[:2], 16) % 200 + 20
    topo = Topology({})
    try:
        link_ns = f"fedllm-{tag}-link"
        _run_ip("netns", "add", link_ns)
        topo.namespaces.append(link_ns)
        _run_ip("-n", link_ns, "link", "set", "lo", "up")
        _run_ip("-n", link_ns, "link", "add", "br0", "type", "bridge")
        _run_ip("-n", link_ns, "addr", "add", f"{SUBNET.format(subnet, 1)}/24", "dev", "br0")
        _run_ip("-n", link_ns, "link", "set", "br0", "up")
        topo.hosts["link"] = (link_ns, SUBNET.format(subnet, 1))
        for k, name in enumerate(nodes):
            ns = f"fedllm-{tag}-n{k}"
            _run_ip("netns", "add", ns)
            topo.namespaces.append(ns)
            _run_ip("-n", ns, "link", "set", "lo", "up")
            outer, inner = f"fl{tag}{k}a", f"fl{tag}{k}b"
            _run_ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _run_ip("link", "set", outer, "netns", link_ns)
            _run_ip("link", "set", inner, "netns", ns)
            _run_ip("-n", link_ns, "link", "set", outer, "master", "br0", "up")
            _run_ip("-n", ns, "addr", "add", f"{SUBNET.format(subnet, k + 2)}/24", "dev", inner)
            _run_ip("-n", ns, "link", "set", inner, "up")
            topo.hosts[name] = (ns, SUBNET.format(subnet, k + 2))
    except BaseException:
        topo.delete()
        raise
    return topo


# ---------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Processes:
    """Everything a test starts, so that ``stop_all`` can end it by PID whatever happened in between."""

    def __init__(self, tmp: Path, topo: Topology, root: Path = ROOT):
        self.tmp = tmp
        self.topo = topo
        self.root = root  # the project tree every command runs from (python -m puts it first on the path)
        self.started: list[Started] = []
        self.seen: set[int] = set()
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "FEDLLM_SHARED": os.environ.get("FEDLLM_SHARED", str(ROOT.parent / "shared")),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def fedllm(self, name: str, host: str, *args: str) -> Started:
        log = self.tmp / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*self.topo.prefix(host), sys.executable, "-m", "fedllm", *args],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def snapshot(self) -> None:
        """Remember every descendant seen, to prove later that none of them outlived the test."""
        for s in self.started:
            try:
                root = psutil.Process(s.proc.pid)
                self.seen.update(p.pid for p in [root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                pass

    def wait_for(self, started: Started, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.snapshot()
            if needle in started.text():
                return
            if started.proc.poll() is not None:
                pytest.fail(f"{started.name} exited {started.proc.returncode}:\n{started.text()[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"{started.name}: no {needle!r} after {timeout:.0f} s:\n{started.text()[-4000:]}")

    def wait_exit(self, started: Started, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while started.proc.poll() is None and time.monotonic() < deadline:
            self.snapshot()
            time.sleep(0.5)
        if started.proc.poll() is None:
            pytest.fail(f"{started.name} still running after {timeout:.0f} s:\n{started.text()[-4000:]}")
        return started.proc.returncode

    def stop_all(self) -> None:
        """SIGTERM each command (it stops its own tree), then SIGKILL whatever of any tree is left."""
        self.snapshot()
        for s in self.started:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for s in self.started:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        leftovers = [psutil.Process(p) for p in self.seen if psutil.pid_exists(p)]
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        for s in self.started:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(timeout=10)

    def survivors(self) -> list[str]:
        """Live processes this test started: any PID seen, or any process holding the test's folder."""
        marker = str(self.tmp)
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(p.info["cmdline"] or [])
                home = p.environ().get("FLWR_HOME", "")
                if p.pid in self.seen or marker in cmdline or home.startswith(marker):
                    found.append(f"{p.pid} {cmdline[:160]}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Topology, Processes]]:
    nodes = list(BUDGETS)
    topo = make_topology(nodes)
    procs = Processes(tmp_path, topo, project_copy(tmp_path / "release"))
    try:
        yield topo, procs
    finally:
        procs.stop_all()
        topo.delete()
        left = procs.survivors()
        listed = (
            subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if topo.namespaces else ""
        )
        assert not left, f"processes left running: {left}"
        assert not [ns for ns in topo.namespaces if ns in listed], "network namespaces left behind"


# ---------------------------------------------------------------------------------------------- consortium


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    filler = "the a of and to in is was for on with as by at from this that".split()
    out = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.choices(filler, k=8) + rng.sample(KEYWORDS[label], 3)
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def make_consortium_files(tmp: Path, topo: Topology, other_ca: bool = False) -> tuple[ConsortiumPaths, Path]:
    """Credentials, one data file and profile per institution, and the deployed scenario (tiny-bert)."""
    certs = ConsortiumPaths(tmp / "consortium")
    sans = sorted({"localhost", "127.0.0.1", topo.address("link")})
    make_consortium(certs.root, sans, list(BUDGETS))
    if other_ca:
        make_consortium(tmp / "other-consortium", sans, [])
    for k, (name, epsilon) in enumerate(BUDGETS.items()):
        site = tmp / "sites" / name
        site.mkdir(parents=True)
        _csv(site / "records.csv", _rows(EXAMPLES, seed=k))
        (site / "profile.toml").write_text(
            f"""[institution]
id = "{name}"
[data]
path = "records.csv"
declared_examples = {EXAMPLES}
[privacy]
epsilon = {epsilon}
delta = 1e-5
planned_rounds = 2
[training]
local_steps = 5
batch_size = 16
[node]
key = "{certs.node_key(name)}"
ca = "{certs.ca_cert}"
state_dir = "state"
"""
        )
    _csv(tmp / "central.csv", _rows(80, seed=99))
    return certs, write_scenario(tmp, "tiny-deployed")


def write_scenario(tmp: Path, name: str, privacy: str = "") -> Path:
    """The deployed scenario, agreeing with every profile on each privacy setting; ``privacy`` adds lines to
    its ``[privacy]`` table (a hostile coordinator's wishes)."""
    clients = "".join(
        f'[[clients]]\nid = "{n}"\nepsilon = {e}\nplanned_rounds = 2\ndeclared_examples = {EXAMPLES}\n'
        "local_steps = 5\nbatch_size = 16\n"
        for n, e in BUDGETS.items()
    )
    scenario = tmp / f"{name}.toml"
    scenario.write_text(
        f"""name = "{name}"
rounds = 2
num_clients = 3
min_clients = 2
[model]
name = "tiny-bert"
mode = "lora"
max_length = 32
[data]
source = "nodes"
labels = {json.dumps(list(LABELS))}
central_test = "{tmp / "central.csv"}"
[training]
local_steps = 5
batch_size = 16
learning_rate = 1e-2
[privacy]
epsilon = 8.0
delta = 1e-5
{privacy}
{clients}"""
    )
    return scenario


def start_server(procs: Processes, certs: ConsortiumPaths, port: int, nodes: list[str]) -> Started:
    keys = [a for n in nodes for a in ("--node-key", f"{certs.node_key(n)}.pub")]
    server = procs.fedllm(
        "superlink", "link", "server", "--certs", str(certs.root), "--address", f"0.0.0.0:{port}", *keys
    )
    procs.wait_for(server, "SuperLink listening", timeout=180)
    return server


def start_client(procs: Processes, topo: Topology, name: str, port: int, *extra: str, profile: Path | None = None):
    profile = profile or procs.tmp / "sites" / name / "profile.toml"
    local_port = str(_free_port()) if topo.hosts[name][0] is None else "9094"
    return procs.fedllm(
        f"node-{name}",
        name,
        "client",
        "--profile",
        str(profile),
        "--superlink",
        f"{topo.address('link')}:{port}",
        "--port",
        local_port,
        *extra,
    )


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_three_institutions_on_separate_nodes_train_two_rounds_with_tls_and_node_auth(world, tmp_path):
    topo, procs = world
    started = time.monotonic()
    certs, scenario = make_consortium_files(tmp_path, topo)
    port = _free_port()
    start_server(procs, certs, port, list(BUDGETS))
    for name in BUDGETS:
        start_client(procs, topo, name, port)
    out = tmp_path / "run"
    run = procs.fedllm(
        "coordinator",
        "link",
        "run",
        "--superlink",
        f"{topo.address('link')}:{port}",
        "--certs",
        str(certs.root),
        "--scenario",
        str(scenario),
        "--out",
        str(out),
    )
    rc = procs.wait_exit(run, timeout=900)
    wall = time.monotonic() - started
    print(f"\ndeploy test: {len(BUDGETS)} nodes, 2 rounds, netns={bool(topo.namespaces)}: {wall:.1f} s wall")
    assert rc == 0, run.text()[-6000:]

    m = read_metrics(out / "metrics.json")
    assert [r.round for r in m.rounds] == [1, 2]
    assert m.transport == "tls"  # recorded by the coordinator from how the run was submitted
    assert all(c.loss is None for r in m.rounds for c in r.clients.values())  # no per-client loss in clear
    with Ledger(out / "ledger.sqlite") as ledger:
        trained = ledger.entries(status="trained")
        assert ledger.verify_chain() == []
    assert sorted((e.client_id, e.round) for e in trained) == sorted((n, r) for n in BUDGETS for r in (1, 2))
    for e in trained:
        assert e.budget_epsilon == BUDGETS[e.client_id] and 0 < e.epsilon <= e.budget_epsilon
    for name, budget in BUDGETS.items():
        own = tmp_path / "sites" / name / "state" / "ledger.sqlite"
        assert own.is_file(), f"{name} keeps its own ledger in its state dir"
        with Ledger(own) as ledger:
            rows = ledger.entries(status="trained")
        assert [e.round for e in rows] == [1, 2] and all(e.client_id == name for e in rows)
        assert rows[-1].epsilon == next(e.epsilon for e in trained if e.client_id == name and e.round == 2)
        assert rows[-1].epsilon <= budget
        # The auditor's copy: each institution hands over its own ledger and the key it registered.
        dest = out / "clients" / name
        dest.mkdir(parents=True)
        shutil.copy(own, dest / "ledger.sqlite")
        shutil.copy(f"{certs.node_key(name)}.pub", dest / "node_key.pub")
    result = audit(out)
    assert result.ok, result.to_dict()
    report = json.loads(write_reports(out)["json"].read_text())["run"]
    assert report["tls"] is True and report["secure_aggregation"] is True and report["transport"] == "tls"
    log = run.text()
    assert "Secure aggregation completed" in log or "SecAgg" in log, "the default config runs SecAgg+"
    assert "PRIVATE KEY" not in "".join(p.text() for p in procs.started)


def _supernode_list(topo: Topology, certs: ConsortiumPaths) -> list[dict]:
    """The SuperLink's own list of nodes, asked from its host through the connection ``fedllm server`` wrote."""
    env = {**os.environ, "FLWR_HOME": str(certs.root / "superlink" / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0"}
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert flwr
    cmd = [*topo.prefix("link"), flwr, "supernode", "list", "--format", "json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout).get("nodes", [])


@pytest.mark.slow
def test_unregistered_key_plain_text_and_a_foreign_ca_are_refused(world, tmp_path):
    topo, procs = world
    started = time.monotonic()
    certs, _ = make_consortium_files(tmp_path, topo, other_ca=True)
    port = _free_port()
    server = start_server(procs, certs, port, ["st-marys"])  # only st-marys is a registered member
    if topo.namespaces:
        # The SuperLink is reached from the node namespaces only through the bridge.
        probe = subprocess.run(
            [*topo.prefix("city-general"), "ip", "route"], capture_output=True, text=True, timeout=30
        ).stdout
        assert topo.address("link").rsplit(".", 1)[0] in probe
    foreign = tmp_path / "sites" / "st-marys" / "foreign.toml"
    own = (tmp_path / "sites" / "st-marys" / "profile.toml").read_text()
    foreign.write_text(own.replace(str(certs.ca_cert), str(tmp_path / "other-consortium" / "ca.crt")))
    retries = ("--max-retries", "2", "--max-wait-time", "30")
    unregistered = start_client(procs, topo, "city-general", port, *retries)
    plain = start_client(procs, topo, "northside", port, "--insecure", *retries)
    wrong_ca = start_client(procs, topo, "st-marys", port, *retries, profile=foreign)
    codes = {s.name: procs.wait_exit(s, timeout=240) for s in (unregistered, plain, wrong_ca)}
    print(f"\nrefusals: exit codes {codes}; {time.monotonic() - started:.1f} s wall")
    assert all(code != 0 for code in codes.values()), codes
    # Flower reports its own code in the log (the process itself exits 1): 305, no connection to the SuperLink.
    assert all("Exit Code: 305" in s.text() for s in (unregistered, plain, wrong_ca))
    assert "Failed to activate SuperNode" in unregistered.text()
    assert "No SuperNode found with the given public key" in server.text()
    assert "WARNING: --insecure" in plain.text()
    assert "SSL/TLS handshake error" in wrong_ca.text()
    nodes = _supernode_list(topo, certs)
    assert len(nodes) == 1, nodes  # registration is the consortium's act alone
    assert [n["status"] for n in nodes] == ["registered"], nodes  # never activated: no node got in


# ---------------------------------------------------------------------------------------------- hostile coordinator

HOSTILE_LINE = (
    '\n__import__("pathlib").Path({marker!r}, __import__("os").environ.get("FLWR_HOME", "-").replace("/", "%"))'
    '.write_text("the coordinator\'s fedllm/client.py ran here")  # and then: ClientBudget.check = lambda *a: None\n'
)


def _submit(procs: Processes, topo: Topology, certs: ConsortiumPaths, port: int, name: str, *extra: str) -> Started:
    """``fedllm run`` from the coordinator's host, waited for; its records go to tmp/NAME."""
    run = procs.fedllm(
        name,
        "link",
        "run",
        "--superlink",
        f"{topo.address('link')}:{port}",
        "--certs",
        str(certs.root),
        "--out",
        str(procs.tmp / name),
        *extra,
    )
    code = procs.wait_exit(run, timeout=900)
    print(f"{name}: exit {code}")
    return run


def _own_rows(tmp: Path, name: str) -> list:
    """The rows of an institution's own ledger that spend or train (a refusal row spends nothing)."""
    own = tmp / "sites" / name / "state" / "ledger.sqlite"
    if not own.exists():
        return []
    with Ledger(own) as ledger:
        return [e for e in ledger.entries() if e.status != "refused"]


@pytest.mark.slow
def test_every_node_refuses_a_coordinator_that_ships_its_own_code_or_switches_dp_off(world, tmp_path):
    topo, procs = world
    started = time.monotonic()
    certs, scenario = make_consortium_files(tmp_path, topo)
    dp_off = write_scenario(tmp_path, "dp-off", privacy="enabled = false")
    marker = tmp_path / "hostile-code-ran"
    marker.mkdir()
    hostile = project_copy(
        tmp_path / "coordinator-copy", {"fedllm/client.py": lambda s: s + HOSTILE_LINE.format(marker=str(marker))}
    )
    port = _free_port()
    start_server(procs, certs, port, list(BUDGETS))
    nodes = {name: start_client(procs, topo, name, port) for name in BUDGETS}

    # (a) The coordinator's own bundle: the same release with one line changed in the client.
    _submit(procs, topo, certs, port, "run-bundle", "--scenario", str(scenario), "--app", str(hostile))
    for name, node in nodes.items():
        assert f"node {name} refuses run " in node.text() and "is not this node's fedllm" in node.text(), name
        assert _own_rows(tmp_path, name) == [], f"{name} wrote ledger rows for a refused bundle"
    ran_at = [p.name for p in marker.iterdir()]
    assert not [home for home in ran_at if "%sites%" in home], f"the bundle's code ran on a node: {ran_at}"
    for name in BUDGETS:
        home = tmp_path / "sites" / name / "state" / "flwr-home"
        assert not (home / "apps").exists(), f"{name} installed the bundle"  # where Flower would install it
        assert not (home / "superexec-auth.secret").exists(), "only the runner holds the SuperExec secret"
    print(f"bundle refused by every node: {time.monotonic() - started:.1f} s")

    # (b) The node's own code, but a run config that switches DP off for everyone.
    before = {name: len(node.text()) for name, node in nodes.items()}
    _submit(procs, topo, certs, port, "run-dp-off", "--scenario", str(dp_off))
    for name, node in nodes.items():
        said = node.text()[before[name] :]
        assert "privacy.enabled" in said and "refuses" in said, f"{name} did not refuse DP off:\n{said[-3000:]}"
        assert _own_rows(tmp_path, name) == [], f"{name} wrote ledger rows for a run with DP off"
    print(f"DP off refused by every node: {time.monotonic() - started:.1f} s")

    # The honest run afterwards, on the same nodes: trains, within each node's own budget.
    run = _submit(procs, topo, certs, port, "run-honest", "--scenario", str(scenario))
    assert run.proc.returncode == 0, run.text()[-6000:]
    with Ledger(tmp_path / "run-honest" / "ledger.sqlite") as ledger:
        trained = ledger.entries(status="trained")
    assert sorted((e.client_id, e.round) for e in trained) == sorted((n, r) for n in BUDGETS for r in (1, 2))
    for name, budget in BUDGETS.items():
        rows = [e for e in _own_rows(tmp_path, name) if e.status == "trained"]
        assert [e.round for e in rows] == [1, 2] and 0 < rows[-1].epsilon <= budget, (name, rows)
    print(f"honest run trained after both refusals: {time.monotonic() - started:.1f} s wall")
