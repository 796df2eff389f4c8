"""How every command line (train.py, infer.py, prepare.py, importers.py, segment.py) ends: `run` gives its exit
status, with an expected failure as one `error:` line and status 2, and an interruption reported as the command
says; the data commands also list their first rejections with a count of the rest (`list_first`)."""

from __future__ import annotations

import sys
from typing import Callable

# Bad input, a refused lock (RuntimeError), a file the disk refused (files.WriteError, a RuntimeError), a missing
# or unreadable path (OSError).
EXPECTED = (ValueError, RuntimeError, OSError)


def run(command: Callable[[], int], interrupted: Callable[[KeyboardInterrupt], int] | None = None) -> int:
    """`command`'s exit status, or 2 once it failed as expected (`EXPECTED`, said in one line by `_fail`).

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
        return _fail(error)


def _fail(error: BaseException) -> int:
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
