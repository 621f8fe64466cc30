"""Bad flags, scenarios and data end with exit 2 and one line naming the flag, field, file or row."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.cli import main

TINY = Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml"


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedllm: error: ")
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--rounds", "0"], "--rounds: must be >= 1"),
        (["--clients", "two"], "--clients: expected an integer"),
        (["--epsilon", "-1"], "--epsilon: must be a finite number > 0"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--mode", "half"], "--mode"),
        (["--clients-per-round", "5"], "clients_per_round: must be between 1 and num_clients (3)"),
        (["--delta", "2"], "privacy.delta: must be in (0, 1)"),
        (["--device", "tpu"], "training.device"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags(capsys, tmp_path, flags, needle):
    _fails(capsys, ["simulate", "tiny", "--quiet", "--out", str(tmp_path / "o"), *flags], needle)
    assert not (tmp_path / "o").exists()


def test_unknown_scenario(capsys):
    _fails(capsys, ["simulate", "no-such-scenario"], "scenario 'no-such-scenario' not found", "hospitals")


def test_unknown_key_in_scenario(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("[privacy]", "[privacy]\nepsilom = 3"))
    _fails(capsys, ["simulate", str(bad)], str(bad), "privacy.epsilom: unknown key")


def test_wrong_type_in_scenario(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("rounds = 2", 'rounds = "two"'))
    _fails(capsys, ["simulate", str(bad)], "rounds: expected int")


def test_duplicate_client_ids(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text() + '\n[[clients]]\nid = "x"\n[[clients]]\nid = "x"\n')
    _fails(capsys, ["simulate", str(bad)], "clients[1].id: duplicate client id")


def test_invalid_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 2")
    _fails(capsys, ["simulate", str(bad)], "bad.toml: invalid TOML")


def test_delta_too_large_for_a_client(capsys, tmp_path):
    _fails(capsys, ["simulate", "tiny", "--delta", "0.1", "--out", str(tmp_path / "o")], "delta: 0.1 must be < 1/n")


def test_missing_column_in_data_file(capsys, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("body,label\nhello,a\nworld,b\n")
    _fails(capsys, ["simulate", "tiny", "--data", str(data), "--out", str(tmp_path / "o")], "d.csv", "text")


def test_unknown_label_in_data_file(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{'a' if i % 2 else 'b'}\n" for i in range(60)) + "oops,c\n")
    bad.write_text(TINY.read_text().replace('source = "synthetic"', f'source = "{data}"\nlabels = ["a", "b"]'))
    _fails(capsys, ["simulate", str(bad), "--out", str(tmp_path / "o")], "d.csv", "row 62", "label", "'c'")


def test_unreadable_model_path(capsys, tmp_path):
    _fails(
        capsys,
        ["simulate", "tiny", "--quiet", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
        "model.name",
    )


def test_out_dir_with_a_ledger_is_not_reused(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ledger.sqlite").write_bytes(b"x")
    _fails(capsys, ["simulate", "tiny", "--out", str(out)], "--out", "already holds")
    assert (out / "ledger.sqlite").read_bytes() == b"x"
