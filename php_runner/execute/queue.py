"""The run queue: runs recorded in the registry as queued, executed later by workers.

A queued run is an ordinary registry run that nobody has claimed yet; ``enqueue`` plans runs
exactly as ``php-run run`` does (done runs stay done, their checks run up front) and stops there.
Workers claim them with ``Registry.claim_next``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from php_runner.errors import InputError
from php_runner.execute.preflight import preflight_all
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord
from php_runner.store.database import resolve_url, shown_url

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun

SQLITE_REFUSAL = (
    "registry {url} is SQLite, which corrupts when jobs on several nodes share it over a network "
    "filesystem; use PostgreSQL (--db postgresql+psycopg://USER:PASSWORD@HOST/DB), or pass --allow-sqlite "
    "when every job runs on this one node"
)


def check_registry_for(executor: str, db_url: str | None, allow_sqlite: bool) -> str:
    """The registry URL jobs of ``executor`` will use; refuses SQLite for Slurm unless allowed."""
    url = resolve_url(db_url)
    if executor == "slurm" and url.startswith("sqlite") and not allow_sqlite:
        raise InputError(SQLITE_REFUSAL.format(url=shown_url(url)))
    return url


def enqueue(planned: Sequence["PlannedRun"], db_url: str | None = None) -> list[RunRecord]:
    """Record ``planned`` as queued runs (existing hashes keep their state) after the pre-flight
    checks of their data and weights (not the device: workers run elsewhere); returns the records
    in the order of ``planned``."""
    registry = Registry(db_url)
    try:
        preflight_all(registry, planned, local=False)  # every check before anything is recorded
        return plan_all(registry, planned)
    finally:
        registry.close()


def plan_all(registry: Registry, planned: Sequence["PlannedRun"], kind: str = "trained") -> list[RunRecord]:
    """Record every planned run (new hashes become queued runs); the same order as ``planned``."""
    return [registry.plan_run(p, kind=kind) for p in planned]
