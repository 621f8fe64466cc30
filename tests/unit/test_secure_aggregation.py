"""SecAgg+ as fedllm configures it: the masked aggregate is FedAvg, dropouts included, and never optional.

The federation test runs Flower's real SecAgg+ workflow and mod (Ray simulation) over clients whose
updates are known in advance, so the masked aggregate can be compared with FedAvg computed in clear.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import ServerApp

from fedllm.config import SecureAggregationConfig
from fedllm.secure_aggregation import (
    SECURE_AGGREGATION,
    Masking,
    apply_delta,
    encode_update,
    fit_workflow,
    secagg_mod,
    zero_update,
)

SETTINGS = SecureAggregationConfig()
SHAPES = [(128, 8), (8, 128), (128, 8), (8, 128), (4, 128), (4,)]  # LoRA-like tensors of a small BERT
CLIENTS = 5
EXAMPLES = [120, 45, 300, 80, 210]
MASKING = Masking(clipping_range=SETTINGS.clipping_range, max_weight=max(EXAMPLES))
GLOBAL = [np.random.default_rng(99).normal(0, 0.05, s).astype(np.float32) for s in SHAPES]
DROPS_ENV = "FEDLLM_TEST_SECAGG_DROP"  # "round:partition": that client fails after the key-sharing stage


def _delta(partition: int, round_: int) -> list[np.ndarray]:
    """A fine-tuning-sized delta (values ~1e-3, norm ~0.06): small enough that a coarse grid would drown it."""
    rng = np.random.default_rng(1000 * round_ + partition)
    return [rng.normal(0, 1e-3, s).astype(np.float32) for s in SHAPES]


def _fedavg(deltas: list[list[np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    total = sum(weights)
    return [
        sum(w * d[i].astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / total
        for i in range(len(SHAPES))
    ]


def _norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(a, dtype=np.float64) ** 2) for a in arrays)))


class _KnownClient(NumPyClient):
    def __init__(self, partition: int):
        self.partition = partition

    def fit(self, parameters, config):
        round_ = int(config["server-round"])
        if os.environ.get(DROPS_ENV) == f"{round_}:{self.partition}":
            raise ConnectionAbortedError("test: client vanished after sharing its keys")
        trained = [p + d for p, d in zip(parameters, _delta(self.partition, round_), strict=True)]
        masking = Masking.from_config(config)
        assert masking == MASKING and config[SECURE_AGGREGATION] is True
        delta, weight = encode_update(trained, parameters, EXAMPLES[self.partition], masking)
        return delta, weight, {}


class _Capture(FedAvg):
    """FedAvg on the legacy API that records the unmasked mean delta SecAgg+ hands it."""

    def __init__(self, out: Path):
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=CLIENTS,
            min_available_clients=CLIENTS,
            initial_parameters=ndarrays_to_parameters(GLOBAL),
            accept_failures=True,
        )
        self.out = out

    def configure_fit(self, server_round, parameters, client_manager):
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.update({"server-round": server_round, **MASKING.to_config()})
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        mean = parameters_to_ndarrays(results[0][1].parameters)
        np.savez(self.out / f"round{server_round}.npz", *mean)
        (self.out / f"round{server_round}.json").write_text(json.dumps({"results": len(results)}))
        return ndarrays_to_parameters(apply_delta(GLOBAL, mean)), {}


@pytest.fixture(scope="module")
def masked_rounds(tmp_path_factory):
    """Two SecAgg+ rounds over 5 clients; in round 2 client 3 vanishes after the key-sharing stage."""
    from flwr.simulation import run_simulation

    out = tmp_path_factory.mktemp("secagg")
    os.environ[DROPS_ENV] = "2:3"  # inherited by the Ray workers started below
    server = ServerApp()

    @server.main()
    def _main(grid, context):
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=2), strategy=_Capture(out))
        DefaultWorkflow(fit_workflow=fit_workflow(SETTINGS, MASKING.max_weight))(grid, legacy)

    client = ClientApp(
        client_fn=lambda ctx: _KnownClient(int(ctx.node_config["partition-id"])).to_client(),
        mods=[secagg_mod(lambda _: True)],
    )
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=CLIENTS)
    finally:
        import ray

        os.environ.pop(DROPS_ENV, None)
        if ray.is_initialized():
            ray.shutdown()
    return {r: [a for _, a in sorted(np.load(out / f"round{r}.npz").items())] for r in (1, 2)}, out


def _relative_error(masked: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return _norm([m - e for m, e in zip(masked, expected, strict=True)]) / _norm(expected)


def test_masked_aggregate_equals_fedavg(masked_rounds):
    rounds, out = masked_rounds
    expected = _fedavg([_delta(p, 1) for p in range(CLIENTS)], EXAMPLES)
    error = _relative_error(rounds[1], expected)
    print(f"SecAgg+ vs FedAvg in clear, 5 clients: relative error {error:.2e}")
    assert error < 0.01  # the bar: 1% of the norm of the average update
    assert error < 1e-5  # what these parameters actually give
    assert json.loads((out / "round1.json").read_text())["results"] == CLIENTS


def test_dropout_after_key_sharing_aggregates_the_survivors(masked_rounds):
    rounds, out = masked_rounds
    survivors = [p for p in range(CLIENTS) if p != 3]
    expected = _fedavg([_delta(p, 2) for p in survivors], [EXAMPLES[p] for p in survivors])
    error = _relative_error(rounds[2], expected)
    print(f"SecAgg+ with a dropout vs FedAvg over the 4 survivors: relative error {error:.2e}")
    assert error < 1e-5
    # and it is not the average over all five: the vanished client's masks were removed, its update absent
    everyone = _fedavg([_delta(p, 2) for p in range(CLIENTS)], EXAMPLES)
    assert _relative_error(rounds[2], everyone) > 0.05
    assert json.loads((out / "round2.json").read_text())["results"] == CLIENTS - 1


def test_flowers_default_grid_would_blur_the_update():
    """Why the parameters matter: Flower's defaults (2**22 steps over +/-8, weight/1000) vs ours, one delta."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    def roundtrip(ratio: float, clip: float, steps: int) -> float:
        delta = _delta(0, 1)
        grid = dequantize(quantize([d.astype(np.float64) * ratio for d in delta], clip, steps), clip, steps)
        return _relative_error([g / ratio for g in grid], delta)

    assert roundtrip(EXAMPLES[0] / 1000, 8.0, 2**22) > 5e-3  # ~1%: the same order as the bar itself
    assert roundtrip(EXAMPLES[0] / MASKING.max_weight, MASKING.clipping_range, SETTINGS.quantization_range) < 1e-5


def test_encode_bounds_values_and_weight():
    received = [np.zeros(4, dtype=np.float32)]
    masking = Masking(clipping_range=2.0, max_weight=50)
    delta, weight = encode_update([np.array([100.0, -3.0, 0.5, 0.0], dtype=np.float32)], received, 80, masking)
    np.testing.assert_allclose(delta[0], [2.0, -2.0, 0.5, 0.0])
    assert weight == 50 and delta[0].dtype == np.float64  # precision for the 2**30 grid
    delta, weight = encode_update([np.full(4, 0.25, dtype=np.float32)], received, 10, masking)
    np.testing.assert_allclose(delta[0], 0.25)
    assert weight == 10
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_update([np.array([np.nan, 0, 0, 0], dtype=np.float32)], received, 10, masking)
    assert [z.shape for z in zero_update(GLOBAL)] == SHAPES and not any(z.any() for z in zero_update(GLOBAL))
    assert Masking.from_config({"server-round": 1}) is None
    assert Masking.from_config(masking.to_config()) == masking


def _train_message(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_client_that_requires_secagg_refuses_a_plain_training_request():
    called = []
    mod = secagg_mod(lambda _: True)
    plain = _train_message(RecordDict({"fitins.config": ConfigRecord({"server-round": 1})}))
    with pytest.raises(PermissionError, match="requires secure aggregation"):
        mod(plain, _context(), lambda m, c: called.append(m))
    assert called == []  # training never ran: nothing to leak
    # a client that does not require it answers plain requests normally
    secagg_mod(lambda _: False)(plain, _context(), lambda m, c: called.append(m))
    assert called == [plain]
