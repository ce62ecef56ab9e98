"""The output-path guard of the command line: no command writes its output over one of its own inputs,
the registry database, or a checkpoint a run of the registry owns, nor starts work it cannot write."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from php_runner.files import OutputError, check_writable
from php_runner.store.database import resolve_url, sqlite_file


def check_output(path: Path, option: str, inputs: Iterable[Path | None] = (), db: str | None = None) -> Path:
    """Refuse ``path`` (given by ``option``) before any work when writing it would destroy something: an input
    of the same command, the registry at ``db`` (its -wal/-shm files too), or a checkpoint one of its runs
    recorded; or when it is a folder or cannot be written. Returns ``path``."""
    target = path.resolve()
    for given in inputs:
        if given is not None and _same(target, Path(given)):
            raise OutputError(f"{option} {path}: is also an input of this command ({given}); write elsewhere")
    database = sqlite_file(resolve_url(db))
    if database is not None and target in {_resolved(database, suffix) for suffix in ("", "-wal", "-shm", "-journal")}:
        raise OutputError(f"{option} {path}: is the registry database; write elsewhere")
    for run_id, checkpoint in _recorded_checkpoints(db, database):
        if _same(target, Path(checkpoint.path)):
            raise OutputError(f"{option} {path}: is the {checkpoint.role} checkpoint of run {run_id} in the registry; "
                              "write elsewhere")
    try:
        check_writable(path)
    except OutputError as err:
        raise OutputError(f"{option} {err}") from None
    return path


def check_outputs(paths: Iterable[Path], option: str, db: str | None = None) -> None:
    """``check_output`` for each of several files one command writes."""
    for path in paths:
        check_output(path, option, db=db)


def _recorded_checkpoints(db: str | None, database: Path | None) -> list:
    from php_runner.store.registry import Registry

    if database is not None and not database.is_file():
        return []  # no registry yet: nothing recorded, and reading creates none
    registry = Registry(db, read_only=True)
    try:
        return registry.checkpoint_owners()
    finally:
        registry.close()


def _resolved(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix).resolve()


def _same(target: Path, other: Path) -> bool:
    try:
        return target == other.resolve() or (target.exists() and other.exists() and target.samefile(other))
    except OSError:
        return False
