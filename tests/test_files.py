"""Tests of files.py: a file or folder is written whole or not at all, and a change of its bytes is named."""

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
    assert [entry.name for entry in tmp_path.iterdir()] == ["export"]
    assert sorted(entry.name for entry in path.iterdir()) == ["new.txt", files.DIGESTS]


def _flip_a_middle_byte(path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def test_a_folder_written_whole_lists_its_digests_and_has_ordinary_permissions(tmp_path):
    path = tmp_path / "export"
    with files.atomic_directory(path) as folder:
        (folder / "weights.bin").write_bytes(os.urandom(4096))
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask, "a renamed temporary folder would be 0700"
    assert files.digest_problem(path) is None
    _flip_a_middle_byte(path / "weights.bin")
    assert files.digest_problem(path) == "weights.bin: its bytes differ from the SHA-256 written with it (damaged or altered)"
    (path / "weights.bin").unlink()
    assert files.digest_problem(path) == "weights.bin: missing"


def test_a_file_with_a_sidecar_digest_names_a_change_of_its_bytes(tmp_path):
    path = tmp_path / "step_00000001.pt"
    path.write_bytes(os.urandom(10_000))
    assert files.digest_problem(path) is None, "no digest written: nothing to check"
    files.write_sidecar_digest(path)
    assert files.digest_problem(path) is None
    _flip_a_middle_byte(path)
    assert "bytes differ" in files.digest_problem(path)
