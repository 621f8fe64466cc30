"""Separate nodes: ``fedllm server``, ``fedllm client`` and ``fedllm run`` around Flower's own programs.

Each command starts one of Flower's processes (``flower-superlink``, ``flower-supernode``, ``flwr run``) with
the consortium's credentials and stays in the foreground until it ends or is stopped; on SIGINT/SIGTERM it
stops the whole process tree it started, by PID. TLS and SuperNode authentication are on unless
``--insecure`` is given, which is never implied and always warned about. Apps never install dependencies at
run time (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), and a node never runs the app bundle a run
brings: ``fedllm client`` answers every message with the node's installed fedllm (:mod:`fedllm.node`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import tomli_w

from fedllm.errors import ConfigError, FedllmError

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


# ------------------------------------------------------------------------------------------------ run


def deployment_config(scenario: str | None) -> Any:
    """The scenario, checked for what a deployed run needs: node-held data and a fixed label space."""
    from fedllm.config import load_config
    from fedllm.data.federation import NODE_SOURCE

    cfg, path = load_config(scenario)
    if cfg.data.source != NODE_SOURCE:
        raise ConfigError(
            f"{path}: data.source: a deployed run needs '{NODE_SOURCE}' (each node reads the file its profile"
            f" names), got '{cfg.data.source}'"
        )
    if cfg.data.labels is None:
        raise ConfigError(f"{path}: data.labels: a deployed run must fix the label space")
    return cfg
