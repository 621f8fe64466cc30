"""Shared fixtures: a tiny random BERT and a small labelled text set, both offline."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_texts():
    """Two clearly separable classes: a keyword decides the label."""
    from fedllm.data.records import TextDataset

    rng = random.Random(0)
    filler = "the a patient bank report visit account note form".split()
    texts, labels = [], []
    for i in range(120):
        label = i % 2
        words = [rng.choice(filler) for _ in range(8)]
        words.insert(rng.randrange(9), "fever" if label else "loan")
        texts.append(" ".join(words))
        labels.append(label)
    return TextDataset(texts=tuple(texts), labels=tuple(labels))


@pytest.fixture(scope="session")
def tokenizer():
    from fedllm.model import load_tokenizer

    return load_tokenizer("tiny-bert")


@pytest.fixture(scope="session")
def simulated_tiny_run(tmp_path_factory):
    """A real ``fedllm simulate`` of simulations/tiny.toml (3 clients, 2 rounds, DP, SecAgg+, signed rows, each
    client's own ledger and key under ``clients/<id>/``). Read-only: tests that alter it use ``tiny_run_copy``."""
    from pathlib import Path

    from fedllm.cli import main

    out = tmp_path_factory.mktemp("tiny-sim") / "run"
    tiny = Path(__file__).resolve().parents[1] / "simulations" / "tiny.toml"
    assert main(["simulate", str(tiny), "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture
def tiny_run_copy(simulated_tiny_run, tmp_path):
    """A fresh copy of ``simulated_tiny_run`` (ledger WAL files included) for a test to tamper with."""
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(simulated_tiny_run, dest)
    return dest


@pytest.fixture
def own_feature_cache(tmp_path, monkeypatch):
    """Each test's features on disk are its own: no test passes on another's cached vectors."""
    from fedllm import features as feats

    monkeypatch.setenv("FEDLLM_FEATURES", str(tmp_path / "features"))
    feats._memory.clear()
    feats._shards_read.clear()


# ---------------------------------------------------------------------------------------------- deployed node

NODE_LABELS = ("finance", "health", "sports", "weather")


class DeployedNode:
    """One institution's node as a deployed SuperNode sees it: a profile, its own data and key, and the
    run config a (possibly hostile) coordinator submits. Tests drive the real client factory with it."""

    def __init__(self, root, rows: int = 40, declared: int = 36, privacy: str = "", training: str = ""):
        from fedllm.signing import load_or_create_key

        self.root = root
        self.declared = declared
        root.mkdir(parents=True, exist_ok=True)
        lines = [f"note {i} about {NODE_LABELS[i % 4]} {NODE_LABELS[i % 4]},{NODE_LABELS[i % 4]}" for i in range(rows)]
        (root / "records.csv").write_text("text,label\n" + "\n".join(lines) + "\n")
        load_or_create_key(root / "node_key")
        (root / "ca.crt").write_text("placeholder: only its presence is checked by the profile\n")
        self.profile = root / "profile.toml"
        self.profile.write_text(
            f"""[institution]
id = "st-marys"
[data]
path = "records.csv"
declared_examples = {declared}
test_fraction = 0.1
[privacy]
epsilon = 3.0
delta = 1e-5
planned_rounds = 2
{privacy}
[training]
local_steps = 2
batch_size = 8
{training}
[node]
key = "node_key"
ca = "ca.crt"
state_dir = "state"
"""
        )

    @property
    def ledger(self):
        return self.root / "state" / "ledger.sqlite"

    def run_config(self, **overrides):
        """The run the coordinator submits: by default exactly what the profile pins for st-marys."""
        from fedllm.config import from_dict

        raw = {
            "name": "deployed",
            "rounds": 2,
            "num_clients": 2,
            "model": {"name": "tiny-bert", "max_length": 16},
            "data": {"source": "nodes", "labels": list(NODE_LABELS), "test_fraction": 0.1},
            "training": {"local_steps": 2, "batch_size": 8},
            "privacy": {"epsilon": 8.0},
            "clients": [{"id": "st-marys", "epsilon": 3.0, "declared_examples": self.declared}, {"id": "city-general"}],
        }
        for key, value in overrides.items():
            node = raw
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
        return from_dict(raw, source="submitted run config")

    def context(self, config, run_id: int = 7):
        from flwr.app import Context, RecordDict

        from fedllm.config import to_toml

        return Context(
            run_id=run_id,
            node_id=1,
            node_config={"profile": str(self.profile)},
            state=RecordDict(),
            run_config={"config-toml": to_toml(config), "out-dir": str(self.root / "run")},
        )

    def client(self, config=None, context=None):
        """The real deployed-node client factory (``fedllm/apps/client.py`` calls the same)."""
        from fedllm.client import client_for
        from fedllm.run.spec import spec_from_run_config

        ctx = context or self.context(config or self.run_config())
        return client_for(spec_from_run_config(ctx.run_config), ctx)


@pytest.fixture
def deployed_node(tmp_path):
    """A factory: ``deployed_node(rows=..., declared=..., privacy="extra = lines")``, each in its own folder."""
    count = iter(range(100))
    return lambda **kw: DeployedNode(tmp_path / f"node{next(count)}", **kw)


@pytest.fixture
def flower_task(monkeypatch):
    """The task identity a node's runtime sets before a ClientApp builds a Message (Flower 1.42 needs it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
