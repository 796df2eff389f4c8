"""The docs say what the program does: every flag of every fenced command in README.md and docs/ is one that
command's `--help` lists (checked without weights, a GPU or running anything)."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex

from conftest import ROOT, script_parser

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def fenced_commands(text: str) -> list[str]:
    """The shell commands of a page's fenced blocks (bash, sh or untagged): continuation lines joined, each
    `&&`-, `;`- or `|`-separated part on its own."""
    commands = []
    for language, block in FENCE.findall(text):
        if language not in ("", "bash", "sh", "shell"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in re.split(r"&&|;|\|", line) if part.strip()]
    return commands


def script_and_flags(command: str) -> tuple[str, list[str], list[str]] | None:
    """A command that runs one of our scripts (`python X.py`, `.venv/bin/python X.py`, `torchrun ... X.py`):
    the script, the words before its first flag (a subcommand) and its `--flags`; None for any other command."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # an unclosed quote in prose-like examples is no command of ours
        return None
    scripts = [index for index, word in enumerate(words) if word.endswith(".py") and (ROOT / word).is_file()]
    if not scripts or not re.search(r"(^|/)(python3?|torchrun)$", words[0]):
        return None
    args = words[scripts[0] + 1:]
    leading = []
    for word in args:
        if word.startswith("-"):
            break
        leading.append(word)
    return words[scripts[0]], leading[:1], [word.split("=")[0] for word in args if word.startswith("--")]


@functools.cache
def help_text(script: str, subcommand: tuple[str, ...]) -> str:
    """What `python SCRIPT [SUBCOMMAND] --help` prints, from the script's own parser."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        script_parser(script)([*subcommand, "--help"])
    return printed.getvalue()


def unknown_flags(command: str) -> list[str]:
    script, subcommand, flags = script_and_flags(command)
    text = help_text(script, tuple(subcommand))
    return [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]


def test_every_flag_of_a_documented_command_is_in_its_help():
    assert unknown_flags("python train.py --no-such-flag --lr 1e-4") == ["--no-such-flag"], "the check finds one"
    assert script_and_flags("tensorboard --logdir runs") is None
    checked, unknown = 0, []
    for page in PAGES:
        for command in fenced_commands(page.read_text(encoding="utf-8")):
            if script_and_flags(command) is None:
                continue
            checked += len(script_and_flags(command)[2])
            unknown += [f"{page.relative_to(ROOT)}: {flag} in: {command}" for flag in unknown_flags(command)]
    assert checked >= 100 and not unknown, "\n".join(unknown)


def test_the_training_flag_table_names_every_best_by_and_guard_metric():
    import config

    rows = {line.split("|")[1].strip(): line for line in (ROOT / "docs" / "training.md").read_text().splitlines()
            if line.startswith("| `--best-by") or line.startswith("| `--guard RULE")}
    best_by, guard = rows["`--best-by METRIC@SET`"], rows["`--guard RULE`"]
    assert all(f"`{metric}`" in best_by for metric in config.BEST_BY), best_by
    assert all(f"`{metric}`" in guard for metric in config.GUARDED), guard
