"""Files that are whole or absent, and whose content is checked: written under a temporary name, fsynced,
then renamed; large ones carry a SHA-256 that is checked before they are loaded.

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
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Where the caches that outlive a run live (`--score-cache`, `--ref-codes-cache`): $XDG_CACHE_HOME/higgs-clone.
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "higgs-clone"


class WriteError(RuntimeError):
    """A file or folder that could not be written (disk full, read-only...): one line naming it."""

    def __init__(self, path: Path, error: BaseException):
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else first_line(error)
        super().__init__(f"cannot write {path}: {reason}")


# A write that fails with this little room left on its disk failed for want of room (filesystems refuse some
# writes while a few blocks are still free, for their own metadata).
FULL_BELOW_BYTES = 16 * 2**20


def _failed_write(path: Path, error: Exception, written: Path) -> WriteError:
    """The WriteError of a failed write into `written` (the temporary file or folder, not yet removed). Some
    writers hide the OSError of a full disk behind their own message (torch's zip writer: `[enforce fail at
    inline_container.cc:664] . unexpected pos ...`); the room left on the disk tells, measured while the partial
    file still fills it."""
    if not (isinstance(error, OSError) and error.errno):
        try:
            full = shutil.disk_usage(written if written.is_dir() else written.parent).free < FULL_BELOW_BYTES
        except OSError:
            full = False
        if full:
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return WriteError(path, error)


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
        failure = _failed_write(path, error, temporary) if isinstance(error, Exception) else None
        temporary.unlink(missing_ok=True)
        if failure:
            raise failure from error
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
    """Yields an empty folder `PATH.tmp-XXXX`; on success its files' SHA-256 are listed in `sha256.json`, every
    file is fsynced and the folder replaces `path` (an older `path` is moved to `PATH.old-XXXX`, then
    deleted), with the permissions of a folder made by `mkdir`; on any failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    old = path.with_name(temporary.name.replace(".tmp-", ".old-"))
    try:
        yield temporary
        write_folder_digests(temporary)
        for folder, _, files in os.walk(temporary, topdown=False):
            for name in files:
                with open(os.path.join(folder, name), "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_directory(Path(folder))
        temporary.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700, private to its owner
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
        fsync_directory(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        failure = _failed_write(path, error, temporary) if isinstance(error, Exception) else None
        shutil.rmtree(temporary, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        if failure:
            raise failure from error
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------
# Content digests: a file or folder whose bytes changed since it was written is named, never loaded
# --------------------------------------------------------------------------

DIGESTS = "sha256.json"  # in a folder: every other file's SHA-256, by its path relative to the folder
SIDECAR_SUFFIX = ".sha256"  # beside a single file: its SHA-256


def sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_sidecar_digest(path: Path) -> Path:
    """`PATH.sha256` holding the SHA-256 of the file at `path` (written whole or not at all)."""
    sidecar = sidecar_of(path)
    write_text(sidecar, sha256(path) + "\n")
    return sidecar


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def move_with_digest(path: Path, target: Path) -> Path:
    """Rename a file or folder to `target`, with its `.sha256` sidecar where it has one."""
    os.replace(path, target)
    if sidecar_of(path).is_file():
        os.replace(sidecar_of(path), sidecar_of(target))
    return target


def write_folder_digests(folder: Path, digests: dict[str, str] | None = None) -> None:
    """`folder/sha256.json` with the SHA-256 of every file in `folder` (relative names), or the given ones
    (files hashed where they were written, e.g. by each process of a sharded checkpoint)."""
    if digests is None:
        digests = {str(path.relative_to(folder)): sha256(path) for path in sorted(folder.rglob("*"))
                   if path.is_file() and path.name != DIGESTS}
    write_text(folder / DIGESTS, json.dumps(digests, indent=1, sort_keys=True) + "\n")


def digest_problem(path: Path) -> str | None:
    """What is wrong with the content of a file (against `PATH.sha256`) or a folder (against its
    `sha256.json`): the first file whose bytes differ from those written, or that is missing; None when all
    match, and None when no digest was written (files from before digests, which cannot be checked)."""
    if not path.is_dir():
        sidecar = sidecar_of(path)
        return _content_problem(path, sidecar.read_text(encoding="utf-8").strip()) if sidecar.is_file() else None
    listing = path / DIGESTS
    if not listing.is_file():
        return None
    try:
        expected = json.loads(listing.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{DIGESTS} is damaged"
    for name, digest in expected.items():
        problem = _content_problem(path / name, digest)
        if problem:
            return f"{name}: {problem}"
    return None


def _content_problem(path: Path, digest: str) -> str | None:
    if not path.is_file():
        return "missing"
    if sha256(path) != digest:
        return "its bytes differ from the SHA-256 written with it (damaged or altered)"
    return None
