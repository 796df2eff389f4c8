"""The repo's shape: modules that import one another without a cycle, a loop readable in one sitting, short
functions, and the one sample builder that training and inference share."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _imported(path: Path) -> set[str]:
    """Our modules that `path` imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                found = visit(imported, path + [imported])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def _functions(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_the_import_graph_has_no_cycle():
    graph = {module: _imported(path) - {module} for module, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"], "the check finds a cycle"


def test_train_py_reads_in_one_sitting_and_no_function_is_long():
    assert len((ROOT / "train.py").read_text(encoding="utf-8").splitlines()) <= 600
    assert dict(_functions(ROOT / "train.py"))["loop"] <= 150
    long = [f"{path.name}:{name} ({lines} lines)" for path in MODULES.values() for name, lines in _functions(path) if lines > 80]
    assert not long, long


def test_one_sample_builder_serves_training_and_inference():
    defined = [module for module, path in MODULES.items()
               if any(name == "build_sample" for name, _ in _functions(path))]
    assert defined == ["data"]
    for user in ("manifest", "generation", "parity"):  # training's samples (via manifest.pair_to_sample) and inference's
        assert "data.build_sample(" in MODULES[user].read_text(encoding="utf-8"), user
