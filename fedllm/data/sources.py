"""What ``data.source`` names, loaded: an ``hf:`` data set, a built-in, a directory of client files or a file.

A directory's files are sorted by name and a file named ``test`` or ``central_test`` is the central test set,
so the client order, and the union's row order, never depend on the OS.
"""

from __future__ import annotations

from pathlib import Path

from fedllm.config.schema import DataConfig
from fedllm.data.builtin import BUILTIN_SOURCES, BUILTINS
from fedllm.data.huggingface import load_huggingface
from fedllm.data.readers import SUPPORTED_SUFFIXES, read_records, suffix_list
from fedllm.data.records import Source
from fedllm.errors import ConfigError, DataError

CENTRAL_TEST_STEMS = ("test", "central_test")


def load_source(cfg: DataConfig, seed: int) -> Source:
    """Built-in names win over same-named paths in the working directory; write ./name for the path."""
    if cfg.source.startswith("hf:"):
        return load_huggingface(cfg.source[3:], cfg)
    if cfg.source in BUILTINS:
        return BUILTINS[cfg.source](seed)
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        return _directory(path, cfg)
    if path.exists() or path.suffix.lower() in SUPPORTED_SUFFIXES:
        return Source(pool=read_records(path, cfg.text_column, cfg.label_column))
    raise ConfigError(
        f"data.source: '{cfg.source}' is neither a built-in data set ({', '.join(BUILTIN_SOURCES)}) nor an "
        "existing file or directory (or use 'hf:<dataset id>')"
    )


def _directory(folder: Path, cfg: DataConfig) -> Source:
    """Files are sorted by name so the client order, and the union's row order, never depend on the OS."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )
    central_files = [p for p in files if p.stem in CENTRAL_TEST_STEMS]
    client_files = [p for p in files if p.stem not in CENTRAL_TEST_STEMS]
    if len(central_files) > 1:
        raise DataError(str(folder), f"more than one central test file: {', '.join(p.name for p in central_files)}")
    if not client_files:
        raise DataError(str(folder), f"no client data files ({suffix_list()}) in this directory")
    stems = [p.stem for p in client_files]
    doubled = sorted({s for s in stems if stems.count(s) > 1})
    if doubled:
        raise DataError(str(folder), f"more than one file for client(s) {', '.join(doubled)}")
    pool = tuple(r for p in client_files for r in read_records(p, cfg.text_column, cfg.label_column))
    central = read_records(central_files[0], cfg.text_column, cfg.label_column) if central_files else None
    return Source(pool=pool, central=central, files=tuple(str(p) for p in client_files))
