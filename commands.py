"""How the data commands (prepare.py, importers.py, segment.py) report: an expected failure as one `error:` line
and exit status 2, and the first rejections listed with a count of the rest."""

from __future__ import annotations

import sys

# Bad input, a refused lock (RuntimeError), a file the disk refused (files.WriteError, a RuntimeError), a missing
# or unreadable path (OSError).
EXPECTED = (ValueError, RuntimeError, OSError)


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
