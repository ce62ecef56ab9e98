"""Claims: who holds a run (``host:pid``), when a claim may be taken over, and whether its holder is dead."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    or_,
)

from php_runner.store.tables import RESUMABLE_STATUSES, Run

if TYPE_CHECKING:
    pass


# A running run whose worker has not written a heartbeat for this long is considered dead.
DEFAULT_STALE_AFTER_S = 120.0


def this_worker() -> str:
    """The worker id of the calling process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claimable_condition(now: float, stale_after: float):
    """The SQL part of the claimable rule: queued, failed, interrupted, or running with a stale heartbeat."""
    return or_(
        Run.status.in_(RESUMABLE_STATUSES),
        (Run.status == "running") & (Run.heartbeat_at < now - stale_after),
    )


def claim_values(worker: str, now: float) -> dict[str, Any]:
    return dict(status="running", worker=worker, heartbeat_at=now, started_at=now, finished_at=None,
                error=None, attempts=Run.attempts + 1)


def pid_is_dead(worker: str | None) -> bool:
    """True when ``worker`` names a process on this host that no longer exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    """A killed process whose parent died too may wait unreaped (as a zombie) for a long time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (not Linux), or it just vanished
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"
