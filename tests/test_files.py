"""Tests of files.py: a file or folder is written whole or not at all."""

from __future__ import annotations

import errno
import os

import pytest

import files


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "export"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(files.WriteError, match="cannot write .*export: No space left on device"):
        with files.atomic_directory(path) as folder:
            (folder / "new.txt").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [entry.name for entry in tmp_path.iterdir()] == ["export"] and [entry.name for entry in path.iterdir()] == ["old.txt"]
    with files.atomic_directory(path) as folder:
        (folder / "new.txt").write_text("new")
    assert [entry.name for entry in tmp_path.iterdir()] == ["export"] and [entry.name for entry in path.iterdir()] == ["new.txt"]
