"""``fedllm server``: the consortium's SuperLink, with TLS and node authentication."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedllm.certs import ConsortiumPaths
from fedllm.deploy import (
    INSECURE_WARNING,
    flower_env,
    flower_program,
    format_address,
    parse_address,
    register_node,
    require_file,
    supervise,
    wait_for_port,
    write_connection,
)
from fedllm.errors import ConfigError


def register(subparsers: Any) -> None:
    server = subparsers.add_parser("server", help="run the consortium's SuperLink (TLS + node authentication)")
    server.add_argument("--certs", type=Path, required=True, help="the directory `fedllm certs` wrote")
    server.add_argument("--address", required=True, metavar="HOST:PORT", help="where to listen, e.g. 0.0.0.0:9092")
    server.add_argument("--node-key", type=Path, action="append", default=[], metavar="PUB", help="admit this node")
    server.add_argument("--state", type=Path, help="SuperLink state (default: CERTS/superlink)")
    server.add_argument("--insecure", action="store_true", help="plain text, no node authentication (testing only)")
    server.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
