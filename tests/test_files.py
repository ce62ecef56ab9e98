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


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from php_runner.files import atomic_path, remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    with atomic_path(tmp_path / "best.pth") as live:
        assert live.exists()
        stale = tmp_path / live.name.replace(f"-pid{os.getpid()}.", f"-pid{dead_pid}.")
        stale.write_bytes(b"left by a killed writer")
        foreign = tmp_path / ".notes.txt.tmp"  # not one of ours
        foreign.write_bytes(b"keep")
        assert remove_stale_temporaries(tmp_path) == [stale]
        assert live.exists() and foreign.exists() and not stale.exists()
