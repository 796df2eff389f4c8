"""How every command line (train.py, infer.py, prepare.py, importers.py, segment.py) ends: `run` gives its exit
status, with an expected failure as one `error:` line and status 2, and an interruption reported as the command
says (one `interrupted:` line and status 130, also while the modules load, `quiet_ctrl_c_while_loading`; train.py
stopped after a step says how to resume); the data commands also list their first rejections with a count of the
rest (`list_first`)."""

from __future__ import annotations

import signal
import sys
from typing import Callable

# Bad input, a refused lock (RuntimeError), a file the disk refused (files.WriteError, a RuntimeError), a missing
# or unreadable path (OSError).
EXPECTED = (ValueError, RuntimeError, OSError)


def run(command: Callable[[], int], interrupted: Callable[[KeyboardInterrupt], int] | None = None) -> int:
    """`command`'s exit status, or 2 once it failed as expected (`EXPECTED`, said in one line by `fail`).

    A Ctrl-C (or a signal a command raises as a KeyboardInterrupt) is
    `interrupted`'s to say, which gives the status (128 + the signal's
    number); without it, Python reports it as it does (status 130).
    """
    try:
        return command()
    except KeyboardInterrupt as interruption:
        if interrupted is None:
            raise
        return interrupted(interruption)
    except EXPECTED as error:
        return fail(error)


def fail(error: BaseException) -> int:
    """Print `error: ...` (for an OSError, its path and reason) and return the exit status 2."""
    if isinstance(error, OSError) and error.filename:
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
    else:
        print(f"error: {error}", file=sys.stderr)
    return 2


def list_first(lines: list[str], shown: int = 5) -> None:
    """The first `shown` lines, indented, then how many more there are."""
    for line in lines[:shown]:
        print(f"  {line}")
    if len(lines) > shown:
        print(f"  ... {len(lines) - shown} more")


def interrupted(message: str) -> int:
    """Print `interrupted: MESSAGE` (what is kept, what to run) and return 130, 128 + SIGINT."""
    print(f"interrupted: {message}", file=sys.stderr)
    return 128 + signal.SIGINT


def quiet_ctrl_c_while_loading() -> None:
    """Until `loaded()`, Ctrl-C ends the command at once with one line and status 130, not a traceback from inside
    an import (torch takes seconds to load). A SIGINT ignored by whoever started us (nohup) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_loading)


def _interrupted_while_loading(_signum, _frame) -> None:
    raise SystemExit(interrupted("while loading, before reading any input: nothing was written"))


def loaded() -> None:
    """Ctrl-C raises KeyboardInterrupt again, which the command's `main` turns into its own line."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)
