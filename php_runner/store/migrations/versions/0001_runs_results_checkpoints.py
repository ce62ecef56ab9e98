"""Schema version 1: runs, per-epoch metrics, selected results, checkpoints, provenance.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _run_child(name: str, *columns: sa.Column, unique: tuple[str, ...] = (), run_id_unique: bool = False) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False,
                  unique=run_id_unique),
        *columns,
        *([sa.UniqueConstraint(*unique)] if unique else []),
    )
    if not run_id_unique:
        op.create_index(f"ix_{name}_run_id", name, ["run_id"])


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("config_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("spec_name", sa.String(128), nullable=False),
        sa.Column("table_name", sa.String(128)),
        sa.Column("row_label", sa.String(256), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("worker", sa.String(256)),
        sa.Column("heartbeat_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("run_dir", sa.Text),
    )
    for column in ("dataset", "table_name", "status"):
        op.create_index(f"ix_runs_{column}", "runs", [column])
    _run_child(
        "epoch_metrics",
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        unique=("run_id", "epoch", "split", "name"),
    )
    _run_child(
        "results",
        sa.Column("rule", sa.String(16), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        unique=("run_id", "rule"),
    )
    _run_child(
        "checkpoints",
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer),
        unique=("run_id", "role"),
    )
    _run_child(
        "provenance",
        *(sa.Column(name, sa.String(64)) for name in ("git_commit", "python", "torch", "torchvision", "php_run")),
        sa.Column("git_dirty", sa.Boolean),
        sa.Column("device", sa.String(256)),
        sa.Column("host", sa.String(256)),
        sa.Column("command", sa.Text),
        sa.Column("recorded_at", sa.Float, nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
        run_id_unique=True,
    )

