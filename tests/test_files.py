"""Atomic writes: all or nothing, no stray temporaries, ordinary permissions."""

from __future__ import annotations

import os

import pytest

from php_runner.files import atomic_path, write_atomic


def test_write_atomic_replaces_the_file_with_the_permissions_of_an_ordinary_write(tmp_path):
    previous = os.umask(0o022)
    try:
        target = write_atomic(tmp_path / "sub" / "report.md", b"new")
        ordinary = tmp_path / "ordinary.md"
        ordinary.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "last.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
