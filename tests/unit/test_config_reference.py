"""docs/configuration.md lists every scenario key and is exactly what the generator writes from the code;
the documented ``hf:<id>?options`` form does what the reference says."""

from __future__ import annotations

import dataclasses
import re
import types

import pytest

from fedllm import config_reference as ref
from fedllm.config import ACCOUNTANTS, DataConfig, FederationConfig
from fedllm.data.federation import load_federated
from fedllm.errors import ConfigError, DataError


def _every_key(cls: type = FederationConfig, prefix: str = "") -> list[str]:
    """Walk the config types themselves (not the generator), so a key the generator skips is caught."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _every_key(hint, f"{prefix}{f.name}.")
        elif f.name == "clients" and not prefix:
            from fedllm.config import ClientConfig

            out += _every_key(ClientConfig, "clients.")
        else:
            out.append(prefix + f.name)
    return out


def test_every_key_is_in_docs_configuration_md():
    doc = ref.DOC.read_text(encoding="utf-8")
    sections = re.split(r"^## ", doc, flags=re.M)
    missing = []
    for key in _every_key():
        table, _, name = key.rpartition(".")
        title = "Top level" if not table else (f"[[{table}]]" if table == "clients" else f"[{table}]")
        body = next((s for s in sections if s.startswith(title + "\n")), "")
        if f"| `{name}` |" not in body:
            missing.append(key)
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def test_docs_configuration_md_is_the_generated_file():
    assert ref.DOC.read_text(encoding="utf-8") == ref.render(), "run: python -m fedllm.config_reference"
    assert ref.main(["--check"]) == 0


def test_every_key_has_type_default_and_meaning():
    keys = {k.key: k for k in ref.keys()}
    assert set(keys) == set(_every_key())
    for k in keys.values():
        assert k.type and k.default and len(k.meaning) >= 10, k
    assert keys["privacy.accountant"].allowed == ", ".join(f"`{a}`" for a in ACCOUNTANTS)
    assert keys["privacy.epsilon"].default == "`8.0`"
    assert keys["secure_aggregation.quantization_range"].default == "`1073741824` (2**30)"
    assert keys["clients.id"].default == "required"


def test_a_field_without_a_meaning_fails_the_generator(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extra:
        documented: int = 1  # a meaning
        undocumented: int = 2

    monkeypatch.setattr(ref, "SECTIONS", (*ref.SECTIONS, ("extra", Extra, "test")))
    with pytest.raises(ref.MissingMeaning, match=r"Extra\.undocumented"):
        ref.render()


def test_hub_form_is_documented():
    doc = ref.DOC.read_text(encoding="utf-8")
    for option in ("subset=", "split=", "test_split=", "revision="):
        assert option in doc


class _Split:
    def __init__(self, texts, labels):
        self.column_names = ["text", "label"]
        self.features = {"label": types.SimpleNamespace(names=None), "text": None}
        self._cols = {"text": texts, "label": labels}

    def __getitem__(self, column):
        return self._cols[column]


def _fake_hub(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def load_dataset(path, name=None, revision=None):
        calls.append({"path": path, "name": name, "revision": revision})
        rows = [(f"text {i} {'a' if i % 2 else 'b'}", "pos" if i % 2 else "neg") for i in range(60)]
        split = _Split([t for t, _ in rows], [lab for _, lab in rows])
        return {"train": split, "validation": _Split(["v one", "v two"], ["pos", "neg"]), "test": split}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_options_reach_load_dataset_and_pick_splits(monkeypatch):
    calls = _fake_hub(monkeypatch)
    cfg = DataConfig(source="hf:org/set?subset=sst2&split=train&test_split=validation&revision=v1.0", partition="iid")
    fed = load_federated(cfg, ["a", "b"], seed=0)
    assert calls == [{"path": "org/set", "name": "sst2", "revision": "v1.0"}]
    assert sorted(fed.central_test.texts) == ["v one", "v two"]  # the validation split, not test
    held_out = load_federated(DataConfig(source="hf:org/set?test_split=none", partition="iid"), ["a", "b"], seed=0)
    assert len(held_out.central_test) == 6  # central_test_fraction 0.1 of the 60 training rows


def test_hub_option_errors_are_one_line(monkeypatch):
    _fake_hub(monkeypatch)
    with pytest.raises(ConfigError, match=r"bad option 'subsett=x'"):
        load_federated(DataConfig(source="hf:org/set?subsett=x", partition="iid"), ["a"], seed=0)
    with pytest.raises(DataError, match=r"split=dev: no such split; splits present: train, validation, test"):
        load_federated(DataConfig(source="hf:org/set?split=dev", partition="iid"), ["a"], seed=0)
