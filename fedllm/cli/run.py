"""``fedllm run``: submit a deployed run to the SuperLink (the coordinator's side)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w

from fedllm.certs import ConsortiumPaths
from fedllm.config import to_toml
from fedllm.deploy import (
    CONNECTION,
    INSECURE_WARNING,
    deployment_config,
    flower_env,
    flower_program,
    format_address,
    parse_address,
    require_file,
    supervise,
    write_connection,
)
from fedllm.errors import ConfigError
from fedllm.paths import project_tree


def register(subparsers: Any) -> None:
    run_ = subparsers.add_parser("run", help="submit a deployed run to the SuperLink (the coordinator's side)")
    run_.add_argument("--superlink", required=True, metavar="HOST:PORT")
    run_.add_argument("--certs", type=Path, help="directory holding the consortium's ca.crt")
    run_.add_argument("--scenario", help="a scenario with data.source = 'nodes' (TOML path or built-in name)")
    run_.add_argument("--out", type=Path, help="run directory on the SuperLink host (default: runs/<name>-<time>)")
    run_.add_argument("--insecure", action="store_true", help="plain text (testing only)")
    # Hidden: submit another project tree than the installed one. Nodes refuse a bundle they do not trust, and
    # the deployment tests use this to play a coordinator that changed a line of the code it ships.
    run_.add_argument("--app", type=Path, help=argparse.SUPPRESS)
    run_.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:

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
