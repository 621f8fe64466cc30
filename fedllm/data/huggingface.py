"""``hf:<id>[?options]`` sources: a data set from the Hugging Face Hub (or the ``datasets`` cache offline)."""

from __future__ import annotations

from typing import Any

from fedllm.config.schema import DataConfig
from fedllm.data.readers import require_columns, suffix_list, to_record
from fedllm.data.records import Record, Source
from fedllm.errors import ConfigError, DataError

HF_OPTIONS = ("subset", "split", "test_split", "revision")


def _hf_options(spec: str) -> tuple[str, dict[str, str]]:
    """``<id>?subset=..&split=..&test_split=..&revision=..`` -> (id, options); an unknown option is an error."""
    dataset_id, _, query = spec.partition("?")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in HF_OPTIONS or not eq or not value:
            raise ConfigError(
                f"data.source: 'hf:{spec}': bad option '{part}' (options: {', '.join(f'{o}=...' for o in HF_OPTIONS)},"
                " joined by '&')"
            )
        options[key] = value
    return dataset_id, options


def load_huggingface(spec: str, cfg: DataConfig) -> Source:
    """``hf:<id>[?options]``: ``subset`` (the configuration), ``split`` to train on (default ``train``),
    ``test_split`` for the central test set (default ``test`` if present; ``none`` holds one out) and
    ``revision`` (pin it: the hub's data can change under a run)."""
    dataset_id, options = _hf_options(spec)
    where = f"hf:{dataset_id}"
    if not dataset_id:
        raise ConfigError("data.source: 'hf:' needs a data set id after the colon, e.g. 'hf:ag_news'")
    try:
        import datasets

        datasets.disable_progress_bars()
        splits = datasets.load_dataset(dataset_id, name=options.get("subset"), revision=options.get("revision"))
    except Exception as exc:  # the hub raises many types (connection, not found, auth); all mean "can't"
        raise DataError(
            where,
            f"cannot load from the Hugging Face Hub ({type(exc).__name__}: {exc}); this machine may be "
            f"offline: save the data as a {suffix_list()} file and set data.source to its path",
        ) from None
    names = list(splits)
    train_name = options.get("split") or ("train" if "train" in splits else (names[0] if len(names) == 1 else None))
    if train_name is None:
        raise DataError(where, f"no 'train' split; splits present: {', '.join(names)} (choose one with ?split=)")
    test_name = options.get("test_split", "test" if "test" in splits else "none")
    for option, name in (("split", train_name), ("test_split", test_name)):
        if name not in splits and not (option == "test_split" and name == "none"):
            raise DataError(where, f"{option}={name}: no such split; splits present: {', '.join(names)}")
    central = None
    if test_name != "none" and test_name != train_name:
        central = _hf_records(splits[test_name], f"{where}/{test_name}", cfg)
    return Source(pool=_hf_records(splits[train_name], f"{where}/{train_name}", cfg), central=central)


def _hf_records(split: Any, where: str, cfg: DataConfig) -> tuple[Record, ...]:
    require_columns(where, split.column_names, (cfg.text_column, cfg.label_column))
    class_names = getattr(split.features[cfg.label_column], "names", None)
    labels = split[cfg.label_column]
    if class_names:  # a ClassLabel column stores indices; the federation works with names
        labels = [class_names[v] if isinstance(v, int) and 0 <= v < len(class_names) else v for v in labels]
    return tuple(
        to_record(where, row, text, label, cfg.text_column, cfg.label_column)
        for row, (text, label) in enumerate(zip(split[cfg.text_column], labels, strict=True), start=1)
    )
