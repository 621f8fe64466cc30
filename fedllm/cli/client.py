"""``fedllm client``: one institution's node, from its profile, answering with its own code."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError, FedllmError


def register(subparsers: Any) -> None:
    client = subparsers.add_parser("client", help="run one institution's SuperNode from its profile")
    client.add_argument("--profile", type=Path, required=True, help="clients/profiles/NAME.toml")
    client.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink (default: the profile's)")
    client.add_argument("--port", type=int, default=9094, help="local ClientApp port, unique per host (9094)")
    client.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    client.add_argument("--max-wait-time", type=float, help="give up after this many seconds without a connection")
    client.add_argument("--insecure", action="store_true", help="plain text, no node key (testing only)")
    client.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The node: ``flower-supernode --isolation process`` plus the node's own runner (:mod:`fedllm.node`).

    The SuperNode connects, receives messages and queues them on its Runtime API (127.0.0.1:``--port``); it
    runs no app. The runner, a thread of this process, answers them with the ClientApp imported here from
    the installed fedllm, for runs its trust policy accepts. The SuperNode's SuperExec authentication
    secret is held by the runner alone (its file is removed once the SuperNode has read it), so no other
    local process can claim the node's tasks.
    """
    # Here, not at the top: `fedllm --help` and every other command would load the ML stack with the app.
    from fedllm import faults
    from fedllm.apps.client import app
    from fedllm.data.readers import read_table
    from fedllm.deploy import (
        INSECURE_WARNING,
        flower_env,
        flower_program,
        format_address,
        node_logging,
        parse_address,
        supervise,
        wait_for_port,
        write_secret,
    )
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
