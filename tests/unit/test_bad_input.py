"""Bad input, table-driven: each case exits non-zero with one line naming the flag, field, file or row,
and nothing already recorded (ledger, checkpoint, metrics) changes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from fedllm.cli import main

TINY = Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml"
GOOD_ROWS = "".join(f"row number {i},{'a' if i % 2 else 'b'}\n" for i in range(80))


def _scenario(tmp: Path, edit: Callable[[str], str]) -> str:
    path = tmp / "bad.toml"
    path.write_text(edit(TINY.read_text()))
    return str(path)


def _data(tmp: Path, content: bytes | str, name: str = "d.csv") -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _with_data(tmp: Path, content: bytes | str, labels: bool = False) -> list[str]:
    data = _data(tmp, content)
    extra = '\nlabels = ["a", "b"]' if labels else ""
    return [_scenario(tmp, lambda t: t.replace('source = "synthetic"', f'source = "{data}"{extra}'))]


CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "zero epsilon flag": (lambda t: ["tiny", "--epsilon", "0"], ("--epsilon", "> 0")),
    "negative epsilon flag": (lambda t: ["tiny", "--epsilon", "-3"], ("--epsilon",)),
    "delta of one": (lambda t: ["tiny", "--delta", "1"], ("privacy.delta", "(0, 1)")),
    "delta above 1/n": (lambda t: ["tiny", "--delta", "0.01"], ("delta", "1/n")),
    "more clients per round than clients": (lambda t: ["tiny", "--clients-per-round", "9"], ("clients_per_round",)),
    "zero local steps": (lambda t: ["tiny", "--local-steps", "0"], ("--local-steps",)),
    "zero epsilon in scenario": (
        lambda t: [_scenario(t, lambda s: s.replace("epsilon = 8.0", "epsilon = 0.0"))],
        ("bad.toml", "privacy.epsilon", "> 0"),
    ),
    "min_clients above sampled": (
        lambda t: [_scenario(t, lambda s: s.replace("min_clients = 1", "min_clients = 5"))],
        ("min_clients",),
    ),
    "client without id": (lambda t: [_scenario(t, lambda s: s + "\n[[clients]]\nepsilon = 2.0\n")], ("clients[0].id",)),
    "duplicate client ids": (
        lambda t: [_scenario(t, lambda s: s + '\n[[clients]]\nid = "h"\n[[clients]]\nid = "h"\n')],
        ("clients[1].id", "duplicate"),
    ),
    "unknown key": (lambda t: [_scenario(t, lambda s: "roundz = 3\n" + s)], ("roundz", "unknown key")),
    "wrong type": (lambda t: [_scenario(t, lambda s: s.replace("seed = 0", 'seed = "zero"'))], ("seed", "int")),
    "invalid TOML": (lambda t: [_scenario(t, lambda s: s + "\n[model\n")], ("bad.toml", "invalid TOML")),
    "missing scenario file": (lambda t: [str(t / "nope.toml")], ("nope.toml", "not found")),
    "missing data file": (lambda t: ["tiny", "--data", str(t / "none.csv")], ("none.csv",)),
    "missing column": (lambda t: _with_data(t, "body,label\n" + GOOD_ROWS), ("d.csv", "text")),
    "empty file": (lambda t: _with_data(t, ""), ("d.csv", "empty")),
    "empty text": (lambda t: _with_data(t, "text,label\n" + GOOD_ROWS + "  ,a\n"), ("d.csv", "row 82", "'text'")),
    "missing label": (lambda t: _with_data(t, "text,label\n" + GOOD_ROWS + "hello,\n"), ("d.csv", "row 82", "label")),
    "unknown label": (
        lambda t: _with_data(t, "text,label\n" + GOOD_ROWS + "hello,zebra\n", labels=True),
        ("d.csv", "row 82", "'zebra'"),
    ),
    "non-UTF-8 bytes": (
        lambda t: _with_data(t, b"text,label\n" + GOOD_ROWS.encode() + b"caf\xe9,a\n"),
        ("d.csv", "row 82", "UTF-8"),
    ),
    "1 MB text": (
        lambda t: _with_data(t, "text,label\n" + GOOD_ROWS + "x" * 1_000_000 + ",a\n"),
        ("d.csv", "row 82", "1,000,000 characters"),
    ),
    "unreadable model path": (lambda t: ["tiny", "--model", str(t / "no-model")], ("model.name",)),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(["simulate", "tiny", "--quiet", "--rounds", "1", "--out", str(out)]) == 0
    return out


def _digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("*")) if p.is_file()}


def _one_line_error(capsys, argv: list[str], needles: tuple[str, ...]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedllm: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_one_line(case, tmp_path, capsys, finished_run):
    build, needles = CASES[case]
    before = _digest(finished_run)
    out = tmp_path / "out"
    _one_line_error(capsys, ["simulate", *build(tmp_path), "--quiet", "--out", str(out)], needles)
    assert not out.exists()
    assert _digest(finished_run) == before


def test_a_corrupt_ledger_is_refused_on_resume_and_left_alone(tmp_path, capsys, finished_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    for name in ("ledger.sqlite-wal", "ledger.sqlite-shm"):
        (run / name).unlink(missing_ok=True)
    (run / "ledger.sqlite").write_bytes(b"\x00garbage" * 512)
    before = _digest(run)
    _one_line_error(capsys, ["simulate", "--resume", str(run)], ("ledger.sqlite", "not a readable privacy ledger"))
    assert _digest(run) == before


def test_a_corrupt_checkpoint_is_refused_on_resume_and_left_alone(tmp_path, capsys, finished_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "checkpoint.npz").write_bytes(b"PK\x03\x04 truncated")
    before = _digest(run)
    _one_line_error(capsys, ["simulate", "--resume", str(run)], ("checkpoint.npz", "unreadable checkpoint"))
    assert _digest(run) == before


def test_table_has_at_least_twenty_cases():
    assert len(CASES) + 2 >= 20
