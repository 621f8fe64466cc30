"""Labelled text for the federation: reading, validating and splitting it among clients.

One concept per module; import the one you need (``from fedllm.data.federation import load_federated``):

* :mod:`~fedllm.data.records` — the validated row, a loaded source, and the datasets a client trains on;
* :mod:`~fedllm.data.readers` — CSV, JSONL, JSON and Parquet files, with errors that name file, row and field;
* :mod:`~fedllm.data.builtin` and :mod:`~fedllm.data.medmcqa` — the built-in data sets;
* :mod:`~fedllm.data.huggingface` — ``hf:<id>?...`` sources;
* :mod:`~fedllm.data.sources` — which of those a ``data.source`` names, and directories of client files;
* :mod:`~fedllm.data.partition` — seeded sampling and the IID, Dirichlet and per-file splits;
* :mod:`~fedllm.data.federation` — the whole federation's data, as every node computes it.

The settings (:class:`~fedllm.config.schema.DataConfig`) belong to the config; this package reads them.
"""
