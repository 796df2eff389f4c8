"""The repo's shape: modules that import one another without a cycle, a loop readable in one sitting, short
functions, the one sample builder that training and inference share, `--eval` without the training stack, and
a core that imports none of the tools around it."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import config
from conftest import ROOT, script_parser

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


# A command line in a docstring: `python FILE ...`, or `torchrun [its flags] FILE ...`.
COMMAND = re.compile(r"^(?:python|torchrun\s.*?)\s(\S+\.py)(?:\s|$)")


def _usage_lines(path: Path) -> list[str]:
    """The command lines of `path`'s module docstring, each joined with the indented `[...]` lines that go on
    with it."""
    lines: list[str] = []
    going_on = False
    for line in (ast.get_docstring(_tree(path), clean=False) or "").splitlines():
        text = line.strip()
        if COMMAND.match(text):
            lines.append(text)
        elif going_on and text.startswith("["):
            lines[-1] += " " + text
        going_on = bool(COMMAND.match(text)) or (going_on and text.startswith("["))
    return lines


def _command(line: str) -> tuple[str, list[str]]:
    """The script and the arguments of a usage line, its metasyntax read: `# comment` dropped, `[--flag ...]`
    as if given, `[placeholder]` and `...` left out."""
    script = COMMAND.match(line).group(1)
    words = shlex.split(line, comments=True)
    argv, group = [], None
    for word in words[words.index(script) + 1:]:
        if group is None and word.startswith("["):
            group = []
        if group is None:
            argv += [] if word == "..." else [word]
            continue
        group.append(word.strip("[]"))
        if word.endswith("]"):
            argv += group if group[0].startswith("-") else []
            group = None
    return script, argv


def _parse_error(script: str, argv: list[str]) -> str | None:
    """Why `script`'s own argument parser (`conftest.script_parser`) refuses `argv`, or None; parsing only,
    nothing is run or opened."""
    parse = script_parser(script)
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            parse(argv)
    except (SystemExit, config.ConfigError) as error:
        return refused.getvalue().strip().splitlines()[-1] if refused.getvalue().strip() else str(error)
    return None


def test_every_usage_line_of_a_module_docstring_parses():
    """Each `python FILE ...` line at the top of a module or a benchmark, read by FILE's parser."""
    assert _command("python memory_plan.py plan --tokens 4096 [--kl-weight 1] [filters] ...  # a comment") == (
        "memory_plan.py", ["plan", "--tokens", "4096", "--kl-weight", "1"])
    assert _parse_error("memory_plan.py", ["run", "--preset", "tiny", "--compile"]), "bench.py's old usage line is refused"
    checked, refused = 0, []
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for line in _usage_lines(path):
            script, argv = _command(line)
            error = _parse_error(script, argv)
            checked += 1
            if error:
                refused.append(f"{path.relative_to(ROOT)}: {line}\n    {error}")
    assert checked >= 30 and not refused, "\n".join(refused)


def test_one_sample_builder_serves_training_and_inference():
    defined = [module for module, path in MODULES.items()
               if any(name == "build_sample" for name, _ in _functions(path))]
    assert defined == ["data"]
    for user in ("manifest", "generation", "parity"):  # training's samples (via manifest.pair_to_sample) and inference's
        assert "data.build_sample(" in MODULES[user].read_text(encoding="utf-8"), user


def _imported_on_import(path: Path) -> set[str]:
    """Our modules that importing `path` imports: its statements outside function bodies (a function's own
    imports run only when it is called)."""
    names = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name.split(".")[0] for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names.add(child.module.split(".")[0])
            visit(child)

    visit(_tree(path))
    return names & set(MODULES)


def _closure(module: str, imported) -> set[str]:
    """The modules `module` reaches through `imported` (a module's path -> the names it imports), itself left out."""
    reached, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(imported(MODULES[name]))
    return reached - {module}


TRAINING_STACK = {"train", "trainable", "loader", "config", "checkpoints", "heldout", "prepare", "parallel"}


def test_eval_runs_without_the_training_stack():
    """`evaluate` reaches no module of the training loop through any of its imports, those inside functions
    too: all of it is `--eval`. `import infer` reaches none through the imports it runs on import; an import
    inside one of its functions is left out, as it runs only in the mode that calls it (`checkpoints`, the
    training stack, only for `--checkpoint`)."""
    assert not _closure("evaluate", _imported) & TRAINING_STACK
    assert not _closure("infer", _imported_on_import) & TRAINING_STACK
    assert "codes" in _closure("evaluate", _imported), "--eval reads its references' codes through codes.py"
    assert {"evaluate", "metrics"} <= _closure("infer", _imported_on_import), "the check follows infer's imports"


def test_compare_loads_no_model():
    """`--compare` reads two finished --eval directories: nothing it reaches, inside functions too, builds, loads
    or runs a model, or belongs to the training loop."""
    assert not _closure("compare", _imported) & (TRAINING_STACK | {"model_utils", "generation", "batched_generation",
                                                                  "evaluate", "codes", "parity"})


CORE = {"train", "trainable", "loader", "data", "collate", "model_utils", "manifest", "codes", "prepare", "generation",
        "batched_generation", "checkpoints", "config", "parallel", "files", "heldout", "evaluate", "infer", "parity", "metrics"}


def test_core_modules_import_no_tool_and_evaluate_only_where_clones_are_judged():
    """The tools around the core (the benchmark, the segmenter, the importers) are never imported by it, and
    `evaluate` only by the modules that judge clones with it: infer.py (`--eval`), heldout.py and train.py."""
    for module in sorted(CORE):
        imported = _imported(MODULES[module])
        assert not imported & {"memory_plan", "segment", "importers"}, module
        assert "evaluate" not in imported or module in {"train", "heldout", "infer"}, module
