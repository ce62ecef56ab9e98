"""Record types: plain dataclass snapshots of what the registry holds, apart from its ORM tables.

Readers (tables, reports, the CLI) depend on these, never on live ORM objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from php_runner.engine.metrics import QueryOutcomes


@dataclass(frozen=True)
class RunRecord:
    id: int
    config_hash: str
    config: dict
    kind: str
    dataset: str
    spec_name: str
    table: str | None
    row_label: str
    seed: int
    preset: str
    status: str
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    heartbeat_at: float | None
    attempts: int
    run_dir: str | None
    executor: str | None
    job_id: str | None

    @property
    def short_hash(self) -> str:
        return self.config_hash[:12]


@dataclass(frozen=True)
class EpochMetrics:
    """The values recorded for one (epoch, split): losses and lr for ``train``, R1..mINP otherwise."""

    epoch: int
    split: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class CheckpointRecord:
    role: str
    path: str
    sha256: str
    epoch: int | None


@dataclass(frozen=True)
class AuditRecord:
    id: int
    run_id: int
    report: dict
    created_at: float


@dataclass
class ResultRow:
    """One selected result of one run (a run has one row per recorded selection rule)."""

    table: str | None
    spec_name: str
    row_label: str
    dataset: str
    seed: int
    rule: str
    metrics: dict
    kind: str
    audit: dict | None
    forced_test: bool = False
    run_id: int | None = None
    # Per-query outcomes of the evaluation behind ``metrics`` (None: not recorded, e.g. a run recorded before
    # they were kept) and of the latest audit's shuffled test order (shuffle seed 0), for intervals.
    outcomes: "QueryOutcomes | None" = None
    shuffled_outcomes: "QueryOutcomes | None" = None
