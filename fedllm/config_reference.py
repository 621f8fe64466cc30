"""``docs/configuration.md``, generated from the scenario's config types so it cannot drift from them.

Every key of a scenario TOML is a field of a dataclass in :mod:`fedllm.config.schema`. Its one line of
meaning is the comment on the field, either at the end of its line or on the comment lines right above it, so
the meaning lives beside the code that defines it; a field without one makes :func:`render` fail. Allowed
values come from the same constants the validator uses. Regenerate with ``python -m fedllm.config_reference``
(``--check`` exits 1 when the file is stale).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

from fedllm.config import schema as C
from fedllm.data.builtin import BUILTIN_SOURCES
from fedllm.data.federation import NODE_SOURCE
from fedllm.data.partition import PARTITIONS
from fedllm.paths import PROJECT_ROOT, has_project_tree

DOC = PROJECT_ROOT / "docs" / "configuration.md"

# (TOML table, dataclass, what the table is for); "" is the top level.
SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("", C.FederationConfig, "The federation: rounds, clients and what leaves a node."),
    ("model", C.ModelConfig, C.ModelConfig.__doc__ or ""),
    ("data", C.DataConfig, "Where the text comes from and how it is split among clients (see *Data sources*)."),
    ("training", C.TrainingConfig, C.TrainingConfig.__doc__ or ""),
    ("privacy", C.PrivacyConfig, C.PrivacyConfig.__doc__ or ""),
    ("clients", C.ClientConfig, C.ClientConfig.__doc__ or ""),
    ("simulation", C.SimulationConfig, C.SimulationConfig.__doc__ or ""),
    ("secure_aggregation", C.SecureAggregationConfig, "Flower's SecAgg+ over update deltas."),
    ("empirical_audit", C.EmpiricalAuditConfig, "A one-run empirical privacy audit (docs/privacy.md); off by default."),
)


def _allowed() -> dict[str, str]:
    """Enumerations, from the constants :func:`fedllm.config.validation.validate` checks against."""
    return {
        "model.mode": ", ".join(f"`{m}`" for m in C.MODES),
        "model.head_init": ", ".join(f"`{m}`" for m in C.HEAD_INITS),
        "privacy.accountant": ", ".join(f"`{a}`" for a in C.ACCOUNTANTS),
        "data.partition": ", ".join(f"`{p}`" for p in PARTITIONS),
        "data.source": ", ".join(f"`{s}`" for s in BUILTIN_SOURCES)
        + f", a file or directory path, `hf:<id>[?options]`, `{NODE_SOURCE}`",
        "training.device": "`auto`, `cpu`, `cuda`, `cuda:N`",
        "empirical_audit.adversary": "`black-box`",
    }


@dataclass(frozen=True)
class Key:
    key: str  # dotted, as on the command line's overrides: privacy.epsilon
    type: str
    default: str
    allowed: str
    meaning: str


class MissingMeaning(ValueError):
    """A config field with no comment: the reference would have a key nobody explained."""


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment (end of line, else the comment lines right above it)."""
    source = inspect.getsource(cls)
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if not line.startswith("    ") or line.startswith("     ") or name not in names or ":" not in stripped:
            continue
        if not stripped.startswith("#") and i in trailing:
            out[name] = trailing[i]
            continue
        above = []
        j = i - 1
        while j >= 1 and lines[j - 1].strip().startswith("#"):
            above.insert(0, lines[j - 1].strip().lstrip("#").strip())
            j -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " (optional)"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(hint, str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "required" if f.default_factory is dataclasses.MISSING else "-"
    value = f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, int) and value >= 2**20 and value & (value - 1) == 0:
        return f"`{value}` (2**{value.bit_length() - 1})"
    return f"`{value}`"


def keys() -> list[Key]:
    """Every scenario key, in section order; raises :class:`MissingMeaning` naming any unexplained field."""
    allowed = _allowed()
    out: list[Key] = []
    missing: list[str] = []
    for table, cls, _ in SECTIONS:
        hints = typing.get_type_hints(cls)
        meanings = _comments(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]) or (table == "" and f.name == "clients"):
                continue  # a sub-table: its keys are listed in its own section
            key = f"{table}.{f.name}" if table else f.name
            if f.name not in meanings:
                missing.append(f"{cls.__name__}.{f.name}")
            hint = hints[f.name]
            allowed_values = allowed.get(key) or ("`true`, `false`" if hint is bool else "")
            out.append(Key(key, _type_name(hint), _default(f), allowed_values, meanings.get(f.name, "")))
    if missing:
        raise MissingMeaning(
            "config fields without a one-line meaning (add a comment on or above the field): " + ", ".join(missing)
        )
    return out


_HF = """\
## Data sources

`data.source` takes, in this order of precedence:

- `hf:<id>` — a data set from the Hugging Face Hub (needs the network, or the `datasets` cache of a machine
  that had it). Options follow a `?`, joined by `&`:
  `hf:<id>?subset=<name>&split=<split>&test_split=<split>&revision=<rev>`.
  - `subset`: the configuration (`name=` of `datasets.load_dataset`), e.g. `hf:glue?subset=sst2`.
  - `split`: the split the clients train on (default `train`, or the only split there is).
  - `test_split`: the split the coordinator evaluates on (default `test` when present; otherwise a
    `data.central_test_fraction` of the training split is held out). `none` holds one out even if `test` exists.
  - `revision`: a branch, tag or commit of the data set repository; pin it to make the run reproducible.

  `data.text_column` and `data.label_column` name the columns; a `ClassLabel` column's names become the labels.
- a built-in name (`{builtins}`);
- a file (`.csv`, `.jsonl`, `.json`, `.parquet`) or a directory of them (one file per client with
  `data.partition = "per-file"`; a file named `test` or `central_test` is the central test set);
- `{nodes}` — a deployed run: each node reads its own file, named in its profile (docs/deployment.md).
"""


def render() -> str:
    lines = [
        "# Scenario configuration reference",
        "",
        "<!-- Generated by `python -m fedllm.config_reference` from fedllm/config/schema.py and"
        " fedllm/data/; do not edit by hand. -->",
        "",
        "A scenario is a TOML file (`simulations/*.toml`, or any path given to `fedllm simulate`). Every key is"
        " optional unless marked required; command-line flags override the matching keys. `unset` means the"
        " key is absent (TOML has no null). Values are checked when the scenario is loaded, with an error"
        " naming the file and the key.",
        "",
    ]
    all_keys = keys()
    for table, _cls, about in SECTIONS:
        title = "Top level" if not table else (f"[[{table}]]" if table == "clients" else f"[{table}]")
        lines += [f"## {title}", "", " ".join(about.split()), ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        prefix = f"{table}." if table else ""
        for k in all_keys:
            if (table and k.key.startswith(prefix)) or (not table and "." not in k.key):
                shown = k.key[len(prefix) :]
                meaning = k.meaning.replace("|", "\\|")
                lines.append(f"| `{shown}` | {k.type} | {k.default} | {k.allowed or '-'} | {meaning} |")
        lines.append("")
    lines.append(_HF.format(builtins="`, `".join(BUILTIN_SOURCES), nodes=NODE_SOURCE))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.config_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    if not has_project_tree():
        print(f"{parser.prog}: needs fedllm's project tree (docs/); it is not installed here", file=sys.stderr)
        return 2
    text = render()
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
        if current != text:
            print(f"{DOC} is out of date: run python -m fedllm.config_reference", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
