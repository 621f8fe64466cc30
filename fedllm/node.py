"""A deployed node answers with its own installed fedllm, never with code the coordinator sent.

Flower ships a run's app bundle (FAB) to every SuperNode, and its stock ClientApp process installs that
bundle and imports it first on the path: whoever submits the run chooses the code that reads the node's
data and enforces its budget. So ``fedllm client`` starts ``flower-supernode --isolation process`` (it
queues one task per message on its local Runtime API and runs nothing) and, next to it, this runner. The
runner imports the node's installed ClientApp (``fedllm.apps.client:app``) before any run exists, claims each task,
decides whether the node takes part in the task's run (:meth:`TrustPolicy.refusal`) and only then calls that
app. The bundle's bytes arrive with the task (the SuperNode reads its ``pyproject.toml`` for the run
config); here they are hashed and nothing else: never unpacked, installed or imported.

The Runtime API calls are Flower 1.42's own (``flwr.supernode.runtime.run_clientapp`` and
``flwr.supercore``), which Flower does not document as public: ``flwr`` is pinned, and
``tests/unit/test_node_runner.py`` exercises them against a real SuperLink and SuperNode.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

import fedllm
from fedllm.errors import FedllmError
from fedllm.paths import PROJECT_ROOT

log = logging.getLogger("fedllm.node")

APP_ID = "fedllm/fedllm"  # what `flwr run` sets as the run's fab_id: [tool.flwr.app] publisher / [project] name
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the one Runtime call SuperExec authentication protects
POLL_S = 0.5  # between AcquireTask calls while the SuperNode has no task queued
TASK_RETRY_S = 60.0  # how long one task's Runtime calls retry a lost local connection before giving up


# ------------------------------------------------------------------------------------------------ trust


@lru_cache(maxsize=4)
def own_bundle_hash(root: Path = PROJECT_ROOT) -> str | None:
    """sha256 of the FAB that ``flwr build`` / ``flwr run`` would make from the installed project tree.

    FAB builds are reproducible (fixed zip dates, sorted paths), so a coordinator that submits the same
    release submits these very bytes. None where fedllm is installed without its project tree (a wheel):
    such a node trusts only its profile's ``allowed_bundles``. Built once per process (about 5 s: Flower
    walks the whole tree, virtual environment included).
    """
    if not (root / "pyproject.toml").is_file():
        return None
    from flwr.cli.build import build_fab_from_disk

    try:
        return hashlib.sha256(build_fab_from_disk(root)).hexdigest()
    except (ValueError, OSError) as exc:
        raise FedllmError(f"{root}: cannot build this node's own app bundle to compare against: {exc}") from None


@dataclass(frozen=True)
class TrustPolicy:
    """Which runs this node takes part in: its own fedllm, as a bundle it built itself or its profile allows."""

    node: str  # the profile's institution id, for the refusal line
    profile: Path  # where allowed_bundles is set, for the refusal line
    version: str = fedllm.__version__
    own_bundle: str | None = None  # own_bundle_hash() of the installed tree
    allowed: frozenset[str] = frozenset()  # the profile's [node] allowed_bundles

    @classmethod
    def for_profile(cls, profile: Any, own_bundle: str | None) -> TrustPolicy:
        """The policy a node's profile (a :class:`fedllm.profile.NodeProfile`) sets."""
        allowed = frozenset(h.lower() for h in profile.allowed_bundles)
        return cls(node=profile.id, profile=profile.source, own_bundle=own_bundle, allowed=allowed)

    def refusal(self, run_id: int, fab_id: str, fab_version: str, fab_hash: str) -> str | None:
        """None if the node takes part in this run, else the one line that says why not.

        The app id and version must be this node's fedllm (the node answers every message with its own code,
        so a run of another app or release would speak a protocol the node does not), and the bundle must be
        the one this node would build from its own tree, or one its operator allowed by hash.
        """
        prefix = f"node {self.node} refuses run {run_id}: "
        if (fab_id, fab_version) != (APP_ID, self.version):
            return f"{prefix}app {fab_id or '?'}=={fab_version or '?'} is not this node's {APP_ID}=={self.version}"
        if fab_hash == self.own_bundle or fab_hash in self.allowed:
            return None
        return (
            f"{prefix}bundle {fab_hash[:12]} is not this node's fedllm {self.version} nor in allowed_bundles"
            f" of {self.profile}"
        )

    def describe(self) -> str:
        own = f"own bundle {self.own_bundle}" if self.own_bundle else "no project tree to build a bundle from"
        return f"fedllm {self.version}, {own}, {len(self.allowed)} allowed bundle(s) in {self.profile}"


# ------------------------------------------------------------------------------------------------ runner


def _runtime_client(address: str, interceptors: Iterable[Any], retry: bool, stop: threading.Event) -> Any:
    """A client of the SuperNode's loopback Runtime API (plain HTTP on 127.0.0.1, as Flower's own processes use).

    Flower's stock retry policy is not used: on a 401 it sends SIGINT to its own process, which here is
    ``fedllm client`` itself. A task's calls retry a lost connection for ``TASK_RETRY_S``; polling retries
    in :meth:`NodeRunner.serve`.
    """
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient

    invoker = None
    if retry:
        invoker = RetryInvoker(
            lambda: exponential(max_delay=5),
            httpx.TransportError,
            max_tries=None,
            max_time=TASK_RETRY_S,
            wait_function=lambda s: stop.wait(s),
        )
    return RuntimeHttpClient.from_server_address(
        address,
        True,
        None,
        [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=invoker,
    )


def _heartbeat(client: Any, task: str) -> Callable[[], bool]:
    """Keep the claimed task alive (it expires after about 30 s without); unlike Flower's own, never signals."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            ok = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.HTTPError:
            return False
        if not ok:
            log.warning("%s: the SuperNode no longer knows this task (expired or its run stopped)", task)
        return True

    return beat


class NodeRunner(threading.Thread):
    """Serves the SuperNode's tasks, one at a time, with the node's own ClientApp (a daemon thread).

    ``app`` is imported by the caller before the SuperNode starts, so a broken install fails at start-up and
    no run can put anything on the import path first. ``secret`` is the SuperExec authentication secret the
    SuperNode was started with: with it, only this runner can claim the node's tasks.
    """

    def __init__(self, address: str, policy: TrustPolicy, app: Any, secret: bytes | None = None):
        super().__init__(name="fedllm-node-runner", daemon=True)
        self.address = address
        self.policy = policy
        self.app = app
        self.secret = secret
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.served = 0  # tasks answered by the app
        self.refused = 0  # tasks refused by the trust policy

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; a task in progress finishes on its own (the thread is a daemon)."""
        self.stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        try:
            self.serve()
        except BaseException as exc:  # the supervisor reports it and stops the SuperNode
            self.error = exc
            log.error("node %s: the runner stopped: %s: %s", self.policy.node, type(exc).__name__, exc)

    def serve(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        interceptors = []
        if self.secret is not None:
            from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={ACQUIRE_TASK})
            )
        poll = _runtime_client(self.address, interceptors, retry=False, stop=self.stopping)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        log.info("node %s: serving tasks from %s with %s", self.policy.node, self.address, self.policy.describe())
        try:
            while not self.stopping.is_set():
                try:
                    res = poll.AcquireTask(request)
                except httpx.TransportError:  # the SuperNode is starting, or stopping
                    self.stopping.wait(POLL_S)
                    continue
                except httpx.HTTPStatusError as exc:  # busy: wait; anything else (401: wrong secret) ends the runner
                    if exc.response.status_code not in (502, 503, 504):
                        raise
                    self.stopping.wait(POLL_S)
                    continue
                if res.HasField("task") and res.token:
                    self.serve_task(res.token, f"task {res.task.task_id} of run {res.task.run_id}")
                else:
                    self.stopping.wait(POLL_S)
        finally:
            poll.close()

    def serve_task(self, token: str, task: str) -> None:
        """Pull the task's input, refuse it or answer it with the node's app, push the reply and the status."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = _runtime_client(self.address, [RuntimeTokenHttpInterceptor(token)], retry=True, stop=self.stopping)
        beat = HeartbeatSender(_heartbeat(client, task))
        beat.start()
        context = None
        status, details = SubStatus.FAILED, "the node's runner failed before answering"
        try:
            message, context, run, fab = pull_task_input(client)
            digest = hashlib.sha256(fab.content).hexdigest()  # of the bytes received, not the label they came with
            why = self.policy.refusal(run.run_id, run.fab_id, run.fab_version, digest)
            if why is not None:
                log.error("%s", why)
                self.refused += 1
                reply, details = Message(Error(code=ErrorCode.INVALID_FAB, reason=why), reply_to=message), why
            else:
                try:
                    reply = self.app(message=message, context=context)
                    status, details = SubStatus.COMPLETED, ""
                    self.served += 1
                except Exception as exc:  # the app's own error goes back to the coordinator, as Flower's does
                    details = f"{type(exc).__name__}: {exc}"
                    log.error("node %s, run %s: %s", self.policy.node, run.run_id, details)
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
            push_message(client, reply, context)
        except Exception as exc:  # lost the task (run stopped, SuperNode gone): report and keep serving
            log.error("node %s, %s: %s: %s", self.policy.node, task, type(exc).__name__, exc)
            details = f"{type(exc).__name__}: {exc}"
        finally:
            push_task_output(client, context, status, details)
            beat.stop()
            client.close()
