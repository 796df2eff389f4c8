"""Files that are whole or absent: written under a temporary name, fsynced, then renamed.

This module owns the one atomic writer. Checkpoints, configs and exports
(`checkpoints.py`, `train.py`), prompt layouts (`data.py`), validation reports
(`manifest.py`), the code cache (`prepare.py`), `--eval`'s clips and cached
scores (`eval_dir.py`, `score_cache.py`) are all written through it, so a
crash or a full disk never leaves half a file under its real name, and a
failure to write is one line naming the path. A file that grows line by line
(`--eval`'s rows.csv) is appended to with `append_text`, each line on disk
before it returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class WriteError(RuntimeError):
    """A file or folder that could not be written (disk full, read-only...): one line naming it."""

    def __init__(self, path: Path, error: BaseException):
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else first_line(error)
        super().__init__(f"cannot write {path}: {reason}")


def first_line(error: BaseException) -> str:
    """The first line of an error's message; its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yields a binary file `PATH.tmp-PID`; on success it is fsynced and renamed to `path`, on any failure
    removed (a failure to write is a WriteError)."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, Exception):
            raise WriteError(path, error) from error
        raise


def write_text(path: Path, text: str) -> None:
    """`text` as UTF-8, through `atomic_file`."""
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))


def append_text(path: Path, text: str) -> None:
    """`text` appended as UTF-8 and fsynced: a crash loses at most the line being written, which a reader can tell
    by its missing newline."""
    try:
        with open(path, "ab") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise WriteError(path, error) from error


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yields an empty folder `PATH.tmp-XXXX`; on success every file in it is fsynced and it replaces
    `path` (an older `path` is moved to `PATH.old-XXXX`, then deleted); on any failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    old = path.with_name(temporary.name.replace(".tmp-", ".old-"))
    try:
        yield temporary
        for folder, _, files in os.walk(temporary, topdown=False):
            for name in files:
                with open(os.path.join(folder, name), "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_directory(Path(folder))
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
        fsync_directory(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(error, Exception):
            raise WriteError(path, error) from error
        raise
