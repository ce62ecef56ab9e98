"""Reading ORM rows into record types, with a one-line error naming the table and row of a damaged value."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from php_runner.errors import InputError
from php_runner.store.database import shown_url
from php_runner.store.records import RunRecord
from php_runner.store.tables import RUN_KINDS, RUN_STATUSES, Run

if TYPE_CHECKING:
    pass


def damaged_error(url: object, table: str, row_id: int, problem: str) -> InputError:
    return InputError(f"registry {shown_url(url)}: table {table}, row {row_id}: {problem}; the database is damaged")


def checked_metrics(url: object, table: str, row_id: int, value: Any) -> dict[str, float]:
    """Stored R1..mINP values: a mapping of names to finite numbers."""
    if not isinstance(value, dict):
        raise damaged_error(url, table, row_id, f"metrics is {type(value).__name__}, not a mapping of names to numbers")
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise damaged_error(url, table, row_id, f"metric {name} is {number!r}, not a finite number")
    return {name: float(number) for name, number in value.items()}


def run_record(row: Run, url: object) -> RunRecord:
    if row.status not in RUN_STATUSES:
        raise damaged_error(url, "runs", row.id, f"status {row.status!r} is not one of {', '.join(RUN_STATUSES)}")
    if row.kind not in RUN_KINDS:
        raise damaged_error(url, "runs", row.id, f"kind {row.kind!r} is not one of {', '.join(RUN_KINDS)}")
    if not isinstance(row.config, dict):
        raise damaged_error(url, "runs", row.id, f"config is {type(row.config).__name__}, not a mapping")
    return RunRecord(
        id=row.id, config_hash=row.config_hash, config=row.config, kind=row.kind, dataset=row.dataset,
        spec_name=row.spec_name, table=row.table_name, row_label=row.row_label, seed=row.seed,
        preset=row.preset, status=row.status, error=row.error, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at, worker=row.worker,
        heartbeat_at=row.heartbeat_at, attempts=row.attempts, run_dir=row.run_dir, executor=row.executor,
        job_id=row.job_id,
    )
