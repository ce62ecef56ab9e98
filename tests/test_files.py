"""Atomic writes: all or nothing, no stray temporaries (a killed writer's are removed by the next write),
ordinary permissions."""

from __future__ import annotations

import errno
import os

import pytest

from php_runner.files import NoSpaceError, OutputError, atomic_path, write_atomic


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


def test_the_next_write_of_a_path_removes_its_killed_writers_temporaries(tmp_path):
    import subprocess
    import sys

    with atomic_path(tmp_path / "probe") as probe:  # its name tells how this host is spelled in them
        host = probe.name.removeprefix(".probe.").split(f"-pid{os.getpid()}.")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    left = {name: tmp_path / f".{name}.{host}-pid{int(dead.stdout)}.a1b2c3d4{suffix}"
            for name, suffix in (("embeddings.npz", ".npz.tmp"), ("other.npz", ".npz.tmp"))}
    for path in left.values():
        path.write_bytes(b"half of a killed write")
    live = tmp_path / f".embeddings.npz.{host}-pid{os.getpid()}.e5f6g7h8.npz.tmp"  # a writer still at work
    live.write_bytes(b"being written")
    with atomic_path(tmp_path / "embeddings.npz", suffix=".npz.tmp") as temporary:
        temporary.write_bytes(b"new")
    assert not left["embeddings.npz"].exists()
    assert left["other.npz"].exists() and live.exists()  # another path's, and a live writer's


def test_a_full_disk_during_a_write_is_one_line_naming_the_path_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "embeddings.npz"
    target.write_bytes(b"old")
    with pytest.raises(NoSpaceError, match="embeddings.npz: no space left"), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["embeddings.npz"]


def test_a_write_larger_than_the_free_space_is_refused_with_the_bytes_needed(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(100, 90, 10))
    with pytest.raises(NoSpaceError, match="11 bytes needed, 10 bytes free"):
        write_atomic(tmp_path / "report.md", b"x" * 11)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_or_a_file_in_the_way_is_refused_before_writing(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError, match="folder: is a folder"):
        write_atomic(tmp_path / "folder", b"data")
    with pytest.raises(OutputError, match="file/out.png: is a folder, or a file stands"):
        write_atomic(tmp_path / "file" / "out.png", b"data")
    assert (tmp_path / "file").read_bytes() == b"x"


def test_a_bug_in_the_writer_still_shows_its_own_error(tmp_path):
    with pytest.raises(OSError) as raised, atomic_path(tmp_path / "x") as temporary:
        temporary.write_bytes(b"half")
        raise OSError(errno.EBADF, "Bad file descriptor")
    assert not isinstance(raised.value, OutputError)


def test_temporaries_of_other_hosts_and_of_other_users_live_writers_are_kept(tmp_path, monkeypatch):
    """A pid means nothing on another host (a shared file system); a pid we may not signal is alive."""
    from php_runner import files
    from php_runner.files import remove_stale_temporaries

    with atomic_path(tmp_path / "probe") as probe:
        host = probe.name.removeprefix(".probe.").split(f"-pid{os.getpid()}.")[0]
    other_host = tmp_path / f".best.pth.{host}x-pid{2**22 + 1}.a1b2c3d4.tmp"  # no such pid here either
    other_user = tmp_path / f".last.pth.{host}-pid{os.getpid()}.e5f6g7h8.tmp"
    for path in (other_host, other_user):
        path.write_bytes(b"being written")

    def not_permitted(pid, signal):
        if pid == os.getpid():
            raise PermissionError(errno.EPERM, "Operation not permitted")
        raise ProcessLookupError(errno.ESRCH, "No such process")

    monkeypatch.setattr(files.os, "kill", not_permitted)
    assert remove_stale_temporaries(tmp_path) == []
    assert other_host.exists() and other_user.exists()


def test_a_read_only_file_system_met_while_writing_is_one_line(tmp_path):
    with pytest.raises(OutputError, match="report.md: cannot write on a read-only file system"), \
            atomic_path(tmp_path / "report.md") as temporary:
        temporary.write_bytes(b"half")
        raise OSError(errno.EROFS, "Read-only file system")
    assert list(tmp_path.iterdir()) == []
