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
    from fedllm.data import TextDataset

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
