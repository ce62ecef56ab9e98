"""Atomic file writes, shared by the library and the runner: a reader sees the old file or the new one,
never half of one, and an interrupted write leaves no stray temporary behind (one killed mid-write is
removed by the next write of the same path)."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import socket
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from php_runner.errors import InputError

_HOST = socket.gethostname().replace(".", "_").replace("-pid", "_pid")
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[^.]+)-pid(?P<pid>[0-9]+)\..+\.tmp$")  # any suffix ending .tmp

# What a full or read-only file system raises while an output is written (the path is checked before).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class OutputError(InputError):
    """An output file that cannot be written here (full or read-only file system, a folder in the way)."""


class NoSpaceError(OutputError):
    """The file system of an output is full."""


def output_problem(path: Path, err: OSError, needed: int | None = None) -> OutputError:
    """One line for an ``OSError`` writing ``path`` (no space, read-only, a folder in the way, no permission),
    saying what the user can do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing_ancestor(path)).free
        amount = f"{needed:,} bytes needed" if needed is not None else "more space needed"
        return NoSpaceError(f"{path}: no space left on the device ({amount}, {free:,} bytes free there); "
                           "free some space or write elsewhere")
    if err.errno == errno.EROFS:
        return OutputError(f"{path}: cannot write on a read-only file system; write elsewhere")
    if err.errno in (errno.EISDIR, errno.ENOTDIR):
        return OutputError(f"{path}: is a folder, or a file stands where a folder is needed; give a file path")
    return OutputError(f"{path}: no permission to write there; write elsewhere")


def check_writable(path: Path) -> None:
    """Refuse, before writing, a ``path`` that is a folder or lies where nothing can be written."""
    if path.is_dir():
        raise output_problem(path, IsADirectoryError(errno.EISDIR, "is a folder"))
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise output_problem(path, NotADirectoryError(errno.ENOTDIR, "not a folder"))
    if not os.access(folder, os.W_OK):  # also false on a read-only file system, even for root
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        raise output_problem(path, OSError(errno.EROFS if read_only else errno.EACCES, "cannot write"))


def _existing_ancestor(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path(".")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, else it is removed.

    The file gets the permissions an ordinary ``open(path, "w")`` would (mkstemp's own are 0600).
    """
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # of this path's killed writers
        _remove_if_stale(leftover)
    # The writer's host and pid in the name let remove_stale_temporaries tell a dead writer's leftover.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-pid{os.getpid()}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            raise output_problem(path, err) from None
        raise


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    free = shutil.disk_usage(_existing_ancestor(Path(path).parent)).free
    if free < len(data):
        raise output_problem(Path(path), OSError(errno.ENOSPC, "no space"), needed=len(data))
    try:
        with atomic_path(path) as temporary:
            temporary.write_bytes(data)
    except NoSpaceError:  # the free space shrank meanwhile
        raise output_problem(Path(path), OSError(errno.ENOSPC, "no space"), needed=len(data)) from None
    return Path(path)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``atomic_path`` temporaries in ``folder`` whose writer (a process of this host) is gone;
    returns them. Those of live writers and of other hosts are left alone."""
    return [path for path in Path(folder).glob(".*.tmp") if _remove_if_stale(path)]


def _remove_if_stale(path: Path) -> bool:
    """Delete ``path`` when it is an ``atomic_path`` temporary of a dead writer of this host."""
    match = _TEMPORARY.match(path.name)
    if match and match["host"] == _HOST and not _alive(int(match["pid"])):
        path.unlink(missing_ok=True)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
