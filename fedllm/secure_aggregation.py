"""Secure aggregation with Flower's SecAgg+: the coordinator learns the weighted sum of updates, nothing else.

What is masked is each client's update *delta* (its trained tensors minus the global ones it received),
not its weights: deltas are small and centred on zero, so SecAgg+'s fixed quantization grid (2**30 steps
over +/- ``clipping_range``) spends its precision where the values are. SecAgg+ multiplies each delta by
its weight / ``max_weight`` before quantizing, so ``max_weight`` is set to the largest client's example
count (not Flower's default 1000, whose grid can drown a fine-tuning update). With both, the masked
aggregate equals plain FedAvg up to stochastic rounding; ``tests/unit/test_secure_aggregation.py`` measures it.

The client also *insists* on the protocol: a client whose config requires secure aggregation answers a
plain training request with an error rather than an update in clear, so a coordinator cannot downgrade.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from fedllm.config import SecureAggregationConfig

log = logging.getLogger("fedllm.secagg")

# The fit-config key by which the coordinator tells clients the round is masked (send a delta, not weights).
SECURE_AGGREGATION = "secure-aggregation"
CLIPPING_KEY = "secagg-clipping-range"
MAX_WEIGHT_KEY = "secagg-max-weight"


@dataclass(frozen=True)
class Masking:
    """The two numbers both sides must agree on; the coordinator sends them with every training request."""

    clipping_range: float
    max_weight: int

    def to_config(self) -> dict[str, Scalar]:
        return {SECURE_AGGREGATION: True, CLIPPING_KEY: self.clipping_range, MAX_WEIGHT_KEY: self.max_weight}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Masking | None:
        """``None`` for a plain round: the client then sends its trained tensors as they are."""
        if not config.get(SECURE_AGGREGATION):
            return None
        return cls(float(config[CLIPPING_KEY]), int(config[MAX_WEIGHT_KEY]))


def fit_workflow(settings: SecureAggregationConfig, max_weight: int) -> SecAggPlusWorkflow:
    """The coordinator's SecAgg+ fit stage, parameterised as :func:`encode_update` assumes."""
    return SecAggPlusWorkflow(
        num_shares=settings.share_fraction,
        reconstruction_threshold=settings.reconstruction_fraction,
        max_weight=float(max_weight),
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=settings.timeout,
    )


def encode_update(
    trained: list[np.ndarray], received: list[np.ndarray], num_examples: int, masking: Masking
) -> tuple[list[np.ndarray], int]:
    """The delta and weight a client hands to SecAgg+: values within the grid, weight within ``max_weight``.

    SecAgg+ would silently cut a value beyond ``clipping_range``; doing it here makes it visible in the log.
    The delta stays float64 (only the masked integers leave the node): in float32, scaling a value onto a
    2**30-step grid would lose the last 6 bits and blur the update by about 1e-4 of its norm.
    (AdamW moves a value by about the learning rate per step, so a delta value rarely nears 1.)
    """
    delta = [
        np.asarray(t, dtype=np.float64) - np.asarray(r, dtype=np.float64)
        for t, r in zip(trained, received, strict=True)
    ]
    if not all(np.isfinite(d).all() for d in delta):
        raise ValueError("the local update holds NaN or Inf; refusing to send it")
    largest = max((float(np.abs(d).max()) for d in delta if d.size), default=0.0)
    if largest > masking.clipping_range:
        log.warning("update values up to %.4g clipped to +/-%g for SecAgg+", largest, masking.clipping_range)
        delta = [np.clip(d, -masking.clipping_range, masking.clipping_range) for d in delta]
    weight = min(num_examples, masking.max_weight)
    if weight < num_examples:
        log.warning("weight %d capped to the round's SecAgg+ max_weight %d", num_examples, masking.max_weight)
    return delta, weight  # float64: SecAgg+ scales to 2**30 steps, beyond float32's 24-bit mantissa


def zero_update(received: list[np.ndarray]) -> list[np.ndarray]:
    """What a client that does not train (budget spent) contributes: nothing, but in the masked shape."""
    return [np.zeros_like(r) for r in received]


def apply_delta(global_arrays: list[np.ndarray], mean_delta: list[np.ndarray]) -> list[np.ndarray]:
    """The next global model: the unmasked weighted-mean delta added to the model the round started from."""
    return [(g + d).astype(g.dtype) for g, d in zip(global_arrays, mean_delta, strict=True)]


def _is_secagg(msg: Message) -> bool:
    records = msg.content.config_records
    return RECORD_KEY_CONFIGS in records and Key.STAGE in records[RECORD_KEY_CONFIGS]


def peers_in_key_sharing(msg: Message) -> int | None:
    """At the masked-vector stage: how many other clients shared keys with this one (None at other stages).

    These are the updates this client's mask is summed with; fewer than its minimum and the sum the
    coordinator unmasks hides the update among too few others.
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
        return None
    return len(configs.get(Key.SOURCE_LIST, []))


def listed_active_and_dead(msg: Message) -> set[int]:
    """At the unmask stage: nodes the server lists as both surviving and dropped.

    For a surviving node a client sends its share of the node's self-mask seed, for a dropped one its share
    of the key behind the pairwise masks; with both, the server could unmask that node's single update.
    Flower's own client sends both; this one refuses. (A server showing different clients different lists
    is not caught by one client alone: ``docs/privacy.md`` states that limit.)
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.UNMASK:
        return set()
    return set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])) & set(configs.get(Key.DEAD_NODE_ID_LIST, []))


def secagg_mod(required: Callable[[Context], bool], min_peers: Callable[[Context], int] = lambda _: 1) -> Mod:
    """SecAgg+ for every masked training request; a plain one is refused where ``required`` says so.

    Flower builds mods at import time, before the run's config exists, so the requirement is asked per
    message. Refusing (an error reply) keeps the update on the node: a coordinator cannot downgrade. A
    masked round in which fewer than ``min_peers`` other clients took part in key sharing is refused
    before training starts, so nothing is spent and nothing is sent.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if _is_secagg(msg):
            both = listed_active_and_dead(msg)
            if both:
                raise PermissionError(
                    f"node(s) {sorted(both)} listed as both surviving and dropped: answering would unmask their"
                    " update; refusing"
                )
            peers, needed = peers_in_key_sharing(msg), min_peers(ctxt)
            if peers is not None and peers < needed:
                raise PermissionError(
                    f"only {peers} other client(s) took part in key sharing, fewer than this node's minimum of"
                    f" {needed}; refusing to send a masked update"
                )
            return secaggplus_mod(msg, ctxt, call_next)
        if required(ctxt):
            raise PermissionError("this client requires secure aggregation; refusing to send its update in clear")
        return call_next(msg, ctxt)

    return mod


__all__ = ["SECURE_AGGREGATION", "apply_delta", "encode_update", "fit_workflow", "secagg_mod", "zero_update"]
