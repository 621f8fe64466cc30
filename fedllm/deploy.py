"""Separate nodes: ``fedllm server``, ``fedllm client`` and ``fedllm run`` around Flower's own programs.

Each command starts one of Flower's processes (``flower-superlink``, ``flower-supernode``, ``flwr run``) with
the consortium's credentials and stays in the foreground until it ends or is stopped; on SIGINT/SIGTERM it
stops the whole process tree it started, by PID. TLS and SuperNode authentication are on unless
``--insecure`` is given, which is never implied and always warned about. Apps never install dependencies at
run time (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), and a node never runs the app bundle a run
brings: ``fedllm client`` answers every message with the node's installed fedllm (:mod:`fedllm.node`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import tomli_w

from fedllm import faults
from fedllm.certs import ConsortiumPaths
from fedllm.errors import ConfigError, FedllmError
from fedllm.paths import project_tree

if TYPE_CHECKING:
    from fedllm.node import NodeRunner

CONNECTION = "fedllm"  # the connection name written into each FLWR_HOME/config.toml
INSECURE_WARNING = (
    "fedllm: WARNING: --insecure: no TLS; model updates, metrics and budgets travel in clear and anyone who can"
    " reach the port can connect"
)
STOP_GRACE_S = 10.0


# ------------------------------------------------------------------------------------------------ helpers


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``; errors name the flag."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def flower_program(name: str) -> str:
    """Flower's console scripts, preferably beside this Python (the venv fedllm runs in)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise FedllmError(f"{name}: not found; install flwr in this environment")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """The environment for a Flower process: its own FLWR_HOME and no run-time dependency installation."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(home: Path, address: str, ca: Path | None) -> Path:
    """``FLWR_HOME/config.toml`` with one default connection: TLS against ``ca``, or plain when ``ca`` is None."""
    entry: dict[str, Any] = {"address": address}
    if ca is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(ca.resolve())
    path = home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: entry}}))
    return path


def require_file(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{flag}: no such file {path}")
    return path.resolve()


def stop_tree(proc: subprocess.Popen[Any]) -> None:
    """Stop a process and every descendant, by PID: SIGTERM, then SIGKILL after a grace period."""
    try:
        root = psutil.Process(proc.pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)
    if proc.poll() is None:
        proc.wait(timeout=STOP_GRACE_S)


class _Stop(Exception):
    """Raised from the signal handler so that a blocking wait unwinds into the cleanup."""


def supervise(
    cmd: list[str],
    env: dict[str, str],
    after_start: Callable[[subprocess.Popen[Any]], None] | None,
    runner: NodeRunner | None = None,
) -> int:
    """Run ``cmd`` in the foreground (with ``runner`` beside it); SIGINT/SIGTERM stop both cleanly and return 0.

    Whichever ends first ends the other: a SuperNode that exits stops the runner, and a runner that dies
    stops the SuperNode's tree (exit 1), so a node never sits connected with nobody answering its tasks.
    """

    def on_signal(signum: int, _frame: Any) -> None:
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        if runner is not None:
            runner.start()
        if after_start is not None:
            after_start(proc)
        while True:
            try:
                return proc.wait(timeout=None if runner is None else 0.5)
            except subprocess.TimeoutExpired:
                if runner is not None and not runner.is_alive():
                    why = f"{type(runner.error).__name__}: {runner.error}" if runner.error else "it stopped"
                    print(f"fedllm: the node runner failed ({why}); stopping {Path(cmd[0]).name}", file=sys.stderr)
                    return 1
    except _Stop as stop:
        print(f"fedllm: stopping {Path(cmd[0]).name} (signal {stop.args[0]})", file=sys.stderr)
        return 0
    finally:
        if proc is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if runner is not None:
                runner.stop()
            stop_tree(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_for_port(host: str, port: int, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedllmError(f"{Path(str(proc.args[0])).name} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise FedllmError(f"{format_address(host, port)}: nothing listening after {timeout:.0f} s")


# ------------------------------------------------------------------------------------------------ server


def register_node(key: Path, env: dict[str, str], attempts: int = 20) -> str:
    """``flwr supernode register KEY`` against the default connection; an already registered key is fine."""
    cmd = [flower_program("flwr"), "supernode", "register", str(key), CONNECTION]
    out = ""
    for _ in range(attempts):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0:
            return out
        if "already" in out.lower():
            return out
        time.sleep(1.0)
    last = out.splitlines()[-1] if out else "no output"
    raise FedllmError(f"--node-key {key}: registration failed ({last})")


def cmd_server(args: argparse.Namespace) -> int:
    host, port = parse_address(args.address, "--address")
    paths = ConsortiumPaths(args.certs.resolve())
    keys = [require_file(k, "--node-key") for k in args.node_key]
    state = (args.state or paths.root / "superlink").resolve()
    env = flower_env(state / "flwr-home")
    cmd = [flower_program("flower-superlink"), "--host", host, "--port", str(port)]
    cmd += ["--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if args.insecure:
        if keys:
            raise ConfigError("--node-key: node authentication needs TLS; drop --insecure or the keys")
        print(INSECURE_WARNING, file=sys.stderr)
        cmd.append("--insecure")
        ca = None
    else:
        ca = require_file(paths.ca_cert, "--certs")
        cmd += ["--ssl-ca-certfile", str(ca)]
        cmd += ["--ssl-certfile", str(require_file(paths.server_cert, "--certs"))]
        cmd += ["--ssl-keyfile", str(require_file(paths.server_key, "--certs"))]
        cmd.append("--enable-supernode-auth")
    # Registration dials this host itself: a wildcard bind is reached through loopback (put it in the SANs).
    local = "localhost" if host in ("0.0.0.0", "::", "") else host
    write_connection(Path(env["FLWR_HOME"]), format_address(local, port), ca)

    def after_start(proc: subprocess.Popen[Any]) -> None:
        wait_for_port("127.0.0.1" if local == "localhost" else local, port, proc)
        for key in keys:
            register_node(key, env)
            print(f"fedllm: registered node key {key}", file=sys.stderr)
        mode = "plain text" if args.insecure else "TLS, node authentication on"
        print(f"fedllm: SuperLink listening on {format_address(host, port)} ({mode}); state in {state}", flush=True)

    return supervise(cmd, env, after_start)


# ------------------------------------------------------------------------------------------------ client


def write_secret(path: Path) -> bytes:
    """A fresh random secret in a file only this user can read (created 0600, never world-readable)."""
    secret = secrets.token_bytes(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


def node_logging() -> None:
    """The runner's refusals and errors on the node's stderr; httpx would log every poll of the Runtime API."""
    logger = logging.getLogger("fedllm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s fedllm %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_client(args: argparse.Namespace) -> int:
    """The node: ``flower-supernode --isolation process`` plus the node's own runner (:mod:`fedllm.node`).

    The SuperNode connects, receives messages and queues them on its Runtime API (127.0.0.1:``--port``); it
    runs no app. The runner, a thread of this process, answers them with the ClientApp imported here from
    the installed fedllm, for runs its trust policy accepts. The SuperNode's SuperExec authentication
    secret is held by the runner alone (its file is removed once the SuperNode has read it), so no other
    local process can claim the node's tasks.
    """
    from fedllm.data import read_table
    from fedllm.node import NodeRunner, TrustPolicy, own_bundle_hash
    from fedllm.profile import NODE_CONFIG_KEY, load_profile

    faults.refuse_if_set("a deployed node")  # test-only switches weaken privacy: never on a real node
    profile = load_profile(args.profile)
    superlink = args.superlink or profile.superlink
    if not superlink:
        raise ConfigError(f"--superlink: required (or set node.superlink in {profile.source})")
    host, port = parse_address(superlink, "--superlink" if args.superlink else f"{profile.source}: node.superlink")
    read_table(profile.data, profile.text_column, profile.label_column)  # bad data fails now, not mid-run
    profile.state_dir.mkdir(parents=True, exist_ok=True)
    env = flower_env(profile.state_dir / "flwr-home")
    node_logging()
    from fedllm.apps.client import app  # the node's own ClientApp, imported before any run can exist

    policy = TrustPolicy.for_profile(profile, own_bundle_hash())
    secret_file = Path(env["FLWR_HOME"]) / "superexec-auth.secret"
    runner = NodeRunner(format_address("127.0.0.1", args.port), policy, app, write_secret(secret_file))
    cmd = [flower_program("flower-supernode"), "--superlink", format_address(host, port)]
    cmd += ["--node-config", f'{NODE_CONFIG_KEY}="{profile.source}"', "--port", str(args.port)]
    cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(profile.ca), "--auth-supernode-private-key", str(profile.node_key)]

    def after_start(proc: subprocess.Popen[Any]) -> None:
        # The SuperNode reads the secret before it opens its Runtime API; then only the runner holds it.
        try:
            wait_for_port("127.0.0.1", args.port, proc, timeout=60)
        except FedllmError:
            pass  # it exited (its own log says why; supervise returns its code) or is slow: the file goes anyway
        finally:
            secret_file.unlink(missing_ok=True)

    print(f"fedllm: node {profile.id} connecting to {format_address(host, port)}; {policy.describe()}", flush=True)
    return supervise(cmd, env, after_start, runner)


# ------------------------------------------------------------------------------------------------ run


def deployment_config(scenario: str | None) -> Any:
    """The scenario, checked for what a deployed run needs: node-held data and a fixed label space."""
    from fedllm.config import load_config
    from fedllm.data import NODE_SOURCE

    cfg, path = load_config(scenario)
    if cfg.data.source != NODE_SOURCE:
        raise ConfigError(
            f"{path}: data.source: a deployed run needs '{NODE_SOURCE}' (each node reads the file its profile"
            f" names), got '{cfg.data.source}'"
        )
    if cfg.data.labels is None:
        raise ConfigError(f"{path}: data.labels: a deployed run must fix the label space")
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from fedllm.config import to_toml

    cfg = deployment_config(args.scenario)
    host, port = parse_address(args.superlink, "--superlink")
    if not args.insecure and args.certs is None:
        raise ConfigError("--certs: required unless --insecure")
    ca = None if args.insecure else require_file(ConsortiumPaths(args.certs.resolve()).ca_cert, "--certs")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    out = (args.out or Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()
    with tempfile.TemporaryDirectory(prefix="fedllm-run-") as tmp:
        env = flower_env(Path(tmp) / "flwr-home")
        write_connection(Path(env["FLWR_HOME"]), format_address(host, port), ca)
        run_config = Path(tmp) / "run-config.toml"
        transport = "insecure" if args.insecure else "tls"  # recorded in metrics.json and the report
        run_config.write_text(tomli_w.dumps({"config-toml": to_toml(cfg), "out-dir": str(out), "transport": transport}))
        # --app: tests play a coordinator with code of its own
        app = (args.app or project_tree("fedllm run (it submits the project tree as the app bundle)")).resolve()
        cmd = [flower_program("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config)]
        cmd.append("--stream")
        print(f"fedllm: submitting '{cfg.name}' to {format_address(host, port)}; records in {out} on the SuperLink")
        return supervise(cmd, env, None)


# ------------------------------------------------------------------------------------------------ commands


def register(subparsers: Any) -> None:
    """Add ``server``, ``client`` and ``run`` to the ``fedllm`` command; dispatch via ``args.handler``."""
    server = subparsers.add_parser("server", help="run the consortium's SuperLink (TLS + node authentication)")
    server.add_argument("--certs", type=Path, required=True, help="the directory `fedllm certs` wrote")
    server.add_argument("--address", required=True, metavar="HOST:PORT", help="where to listen, e.g. 0.0.0.0:9092")
    server.add_argument("--node-key", type=Path, action="append", default=[], metavar="PUB", help="admit this node")
    server.add_argument("--state", type=Path, help="SuperLink state (default: CERTS/superlink)")
    server.add_argument("--insecure", action="store_true", help="plain text, no node authentication (testing only)")
    server.set_defaults(handler=cmd_server)

    client = subparsers.add_parser("client", help="run one institution's SuperNode from its profile")
    client.add_argument("--profile", type=Path, required=True, help="clients/profiles/NAME.toml")
    client.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink (default: the profile's)")
    client.add_argument("--port", type=int, default=9094, help="local ClientApp port, unique per host (9094)")
    client.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    client.add_argument("--max-wait-time", type=float, help="give up after this many seconds without a connection")
    client.add_argument("--insecure", action="store_true", help="plain text, no node key (testing only)")
    client.set_defaults(handler=cmd_client)

    run = subparsers.add_parser("run", help="submit a deployed run to the SuperLink (the coordinator's side)")
    run.add_argument("--superlink", required=True, metavar="HOST:PORT")
    run.add_argument("--certs", type=Path, help="directory holding the consortium's ca.crt")
    run.add_argument("--scenario", help="a scenario with data.source = 'nodes' (TOML path or built-in name)")
    run.add_argument("--out", type=Path, help="run directory on the SuperLink host (default: runs/<name>-<time>)")
    run.add_argument("--insecure", action="store_true", help="plain text (testing only)")
    # Hidden: submit another project tree than the installed one. Nodes refuse a bundle they do not trust, and
    # the deployment tests use this to play a coordinator that changed a line of the code it ships.
    run.add_argument("--app", type=Path, help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run)
