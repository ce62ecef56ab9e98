"""The registry's ORM tables (the current schema) and their conversion to record types.

Every change to these models comes with an Alembic revision in ``store/migrations/versions``; a test
compares the models with the migrated schema, so a model change without its revision fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

if TYPE_CHECKING:
    pass


RUN_KINDS = ("trained", "imported", "trial")
# "interrupted": stopped by Ctrl-C/SIGTERM (resumable like "failed", but nothing went wrong). A plain
# string column (no enum or check constraint), so the new value needs no schema revision.
RUN_STATUSES = ("queued", "running", "done", "failed", "interrupted")
RESUMABLE_STATUSES = ("queued", "failed", "interrupted")  # claimable again (from last.pth when there is one)
# final-test: test metrics of the selected checkpoint computed once after training (tuning trials,
# which never evaluate test while they train).
RULES = ("best-on-test", "best-on-val", "last", "final-test")


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    config_hash: Mapped[str] = mapped_column(String(64), unique=True)
    config: Mapped[dict] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(16), default="trained", server_default="trained")
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    spec_name: Mapped[str] = mapped_column(String(128))
    table_name: Mapped[str | None] = mapped_column(String(128), index=True)
    row_label: Mapped[str] = mapped_column(String(256))
    seed: Mapped[int] = mapped_column(Integer)
    preset: Mapped[str] = mapped_column(String(64))
    # queued | running | done | failed; a running run whose worker died is claimable again
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(256))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_dir: Mapped[str | None] = mapped_column(Text)
    # Where the run's worker was dispatched (local, slurm) and that executor's job id, for status/cancel.
    executor: Mapped[str | None] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(128))


class RunLabel(Base):
    """A place a run fills: one config can be a cell of several tables (the full model is the
    headline row, the cnum-9 row, the module-ablation "full" row, ...), but it trains once."""

    __tablename__ = "run_labels"
    __table_args__ = (UniqueConstraint("run_id", "spec_name", "row_label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    spec_name: Mapped[str] = mapped_column(String(128))
    table_name: Mapped[str | None] = mapped_column(String(128), index=True)
    row_label: Mapped[str] = mapped_column(String(256))


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch", "split", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("run_id", "rule"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    rule: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "role"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[int | None] = mapped_column(Integer)


class Provenance(Base):
    __tablename__ = "provenance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), unique=True)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    git_dirty: Mapped[bool | None] = mapped_column(Boolean)
    python: Mapped[str | None] = mapped_column(String(64))
    torch: Mapped[str | None] = mapped_column(String(64))
    torchvision: Mapped[str | None] = mapped_column(String(64))
    php_run: Mapped[str | None] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(256))
    host: Mapped[str | None] = mapped_column(String(256))
    command: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[float] = mapped_column(Float)
    extra: Mapped[dict] = mapped_column(JSON)


class Audit(Base):
    __tablename__ = "audits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    report: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


# Where a set of per-query outcomes comes from: "evaluation" is the evaluation a result's (epoch, split) names
# (an in-training epoch, or an imported checkpoint's test); "final-test" the result of that rule;
# "audit-ordered" and "audit-shuffled-SEED" the latest audit's test evaluations (annotation / shuffled order).
EVALUATION_SOURCE = "evaluation"
FINAL_TEST_SOURCE = "final-test"
AUDIT_ORDERED_SOURCE = "audit-ordered"
AUDIT_SHUFFLED_SOURCE = "audit-shuffled-{seed}"


class QueryOutcome(Base):
    """The per-query outcomes of one recorded evaluation (``engine.metrics.QueryOutcomes.to_bytes``)."""

    __tablename__ = "query_outcomes"
    __table_args__ = (UniqueConstraint("run_id", "source", "epoch", "split"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))
    data: Mapped[bytes] = mapped_column(LargeBinary)


PROVENANCE_FIELDS = (
    "git_commit", "git_dirty", "python", "torch", "torchvision", "php_run", "device", "host", "command",
)
