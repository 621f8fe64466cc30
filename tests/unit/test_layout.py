"""The package's shape, checked: no import circle, no oversized module, one owner for run-directory names,
and a client that never loads the audit.

Each check reads the source (``ast``), so it holds for imports inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import ROOT

PACKAGE = ROOT / "fedllm"
MAX_LINES = 400
# One algorithm each, too long to split without cutting it in half.
ONE_ALGORITHM: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the fedllm modules it imports (top-level or in a function; packages resolve to __init__)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                target = resolve(name) if name.startswith("fedllm") else None
                if target and target not in (mod, "fedllm") and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_the_limit_unless_it_is_one_algorithm() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert {m: n for m, n in long.items() if m not in ONE_ALGORITHM} == {}


def test_run_directory_names_have_one_owner() -> None:
    """File names of a run directory are written in fedllm/run/rundir.py only (docstrings may name them)."""
    names = {"config.toml", "ledger.sqlite", "metrics.json", "checkpoint.npz", "report.html", "extra_rows.jsonl"}
    others = {"fedllm.deploy": "Flower's own FLWR_HOME/config.toml, not a run's"}
    offenders = []
    for mod, path in _modules().items():
        if mod == "fedllm.run.rundir" or mod in others:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names:
                    offenders.append(f"{mod}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_the_client_never_imports_the_audit() -> None:
    """Canaries reach a client as plain rows; nothing of the auditor's (coins, adversary) is in its code."""
    graph = import_graph()
    assert not [m for m in reachable(graph, "fedllm.client") if m.startswith("fedllm.audit")]
    # and at run time, through every import the client's module really executes
    code = "import sys, fedllm.client; print(sorted(m for m in sys.modules if m.startswith('fedllm.audit')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_empirical_bound_and_result_import_nothing_of_the_project() -> None:
    graph = import_graph()
    leaves = [m for m in graph if m.startswith("fedllm.audit.empirical_")]
    assert leaves, "the empirical audit's bound and result modules moved: update this test"
    for mod in leaves:
        if mod.endswith(("_bound", "_result")):
            assert graph[mod] <= {"fedllm.audit"}, (mod, graph[mod])
