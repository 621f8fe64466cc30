"""Fault switches for tests: a client that vanishes or stalls mid-round, DP-SGD without noise.

Each switch weakens what a run promises (no-noise makes the ledger lie about the mechanism), so a switch
works only inside an in-process simulation that a test started: the test sets ``FEDLLM_TESTING=1`` and
``fedllm simulate`` marks its own process and Ray workers with ``FEDLLM_IN_SIMULATION=1``. Anywhere else a
set switch is not ignored but refused: a deployed node, ``fedllm client`` and a simulation started
without the test marker all stop with one line naming the variable, before any data is read.
"""

from __future__ import annotations

import logging
import os
import time

from fedllm.errors import ConfigError

VANISH = "FEDLLM_FAULT_VANISH"  # "client-id:round": the client aborts that round after reserving its spend
STALL = "FEDLLM_FAULT_STALL"  # "client-id:round": the client hangs after reserving (resume tests kill mid-round)
NO_NOISE = "FEDLLM_FAULT_NO_NOISE"  # "1": DP-SGD adds no noise while the ledger records the planned mechanism
SWITCHES = (VANISH, STALL, NO_NOISE)
TESTING = "FEDLLM_TESTING"  # set by a test that means to use a switch
IN_SIMULATION = "FEDLLM_IN_SIMULATION"  # set by the simulation engine for itself and its workers

log = logging.getLogger("fedllm.faults")


def set_switches() -> list[str]:
    return [name for name in SWITCHES if os.environ.get(name)]


def _allowed() -> bool:
    return os.environ.get(TESTING) == "1" and os.environ.get(IN_SIMULATION) == "1"


def refuse_if_set(where: str) -> None:
    """Called where a run starts: a deployed node refuses any switch; a simulation needs the test marker."""
    found = set_switches()
    if not found:
        return
    if where != "simulation" or os.environ.get(TESTING) != "1":
        raise ConfigError(
            f"{found[0]} is set: fault switches weaken privacy and work only in a simulation started by the tests"
            f" ({TESTING}=1); refusing to start {where}"
        )


def armed(name: str, value: str = "1") -> bool:
    """True when switch ``name`` is set to ``value`` in a process where switches are allowed."""
    if os.environ.get(name) != value:
        return False
    if not _allowed():
        raise ConfigError(f"{name} is set outside a test simulation; refusing to run with a fault switch")
    log.critical("%s=%s: fault injection for tests is active in this process", name, value)
    return True


def maybe_vanish_or_stall(client_id: str, server_round: int) -> None:
    """Fired after the spend is reserved and before training.

    Vanish aborts the client's round: no reply reaches the coordinator, so to it the client has vanished
    (an ``os._exit`` would be closer to a power cut, but in simulation it would also kill the shared Ray
    worker that serves other clients). Stall hangs the round instead, so a test can kill the coordinator
    at a known point mid-round.
    """
    key = f"{client_id}:{server_round}"
    if armed(VANISH, key):
        raise ConnectionAbortedError(f"fault injection: client {client_id} vanished in round {server_round}")
    if armed(STALL, key):
        time.sleep(3600)
