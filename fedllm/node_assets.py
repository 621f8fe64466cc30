"""What a node prepares once from its rows and reuses every round: tokens, or frozen-encoder features.

Simulation partitions the scenario's data and hands each client its split; a deployed node reads its own
file (:mod:`fedllm.profile`). Either way the split becomes the datasets below once per process, so a node
tokenizes (or embeds) once per run, not once per round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fedllm.config import FederationConfig
from fedllm.data.readers import read_table
from fedllm.data.records import ClientSplit, TextDataset
from fedllm.errors import ConfigError
from fedllm.features import FeatureDataset, node_dataset
from fedllm.head_lora import HEAD_LORA
from fedllm.training import TokenizedDataset


@dataclass
class NodeAssets:
    """One client's split as it trains and is scored: token rows, or in head mode the frozen encoder's
    features; head-lora keeps both (features for its head phase, tokens once LoRA trains)."""

    split: ClientSplit
    num_labels: int
    train: TokenizedDataset | FeatureDataset
    test: TokenizedDataset | FeatureDataset
    head_train: FeatureDataset | None = None  # head-lora's head phase: the same rows as frozen features


def with_extra_rows(split: ClientSplit, path: Path, label_names: tuple[str, ...]) -> ClientSplit:
    """``split`` with the rows of ``path`` (columns text and label, a label name) added to its training data.

    Extra rows in a client's state folder (``ClientDir.extra_rows_path``) are how an empirical audit's
    canaries reach the audited client: as plain training rows, read like any data file. The client does not
    know that it is audited, and nothing of the audit is imported here.
    """
    index = {name: i for i, name in enumerate(label_names)}
    rows = read_table(path, "text", "label")
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise ConfigError(f"{path}: label(s) {', '.join(unknown)} are not among the federation's labels")
    train = TextDataset(
        split.train.texts + tuple(text for text, _ in rows),
        split.train.labels + tuple(index[label] for _, label in rows),
    )
    return replace(split, train=train)


def assets_for(config: FederationConfig, split: ClientSplit, num_labels: int) -> NodeAssets:
    """Tokenize (or embed) one client's split once: simulation partitions the data, a deployed node reads its
    own file. Head-mode features are computed on the node and cached there (``fedllm/features.py``)."""
    return NodeAssets(
        split=split,
        num_labels=num_labels,
        train=node_dataset(config.model, split.train),
        test=node_dataset(config.model, split.test),
        head_train=FeatureDataset(split.train, config.model) if config.model.mode == HEAD_LORA else None,
    )
