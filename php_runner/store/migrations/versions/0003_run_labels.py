"""Schema version 3: run labels, so that one run can fill cells of several tables; existing runs keep theirs.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_labels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("spec_name", sa.String(128), nullable=False),
        sa.Column("table_name", sa.String(128)),
        sa.Column("row_label", sa.String(256), nullable=False),
        sa.UniqueConstraint("run_id", "spec_name", "row_label"),
    )
    op.create_index("ix_run_labels_run_id", "run_labels", ["run_id"])
    op.create_index("ix_run_labels_table_name", "run_labels", ["table_name"])
    op.execute(
        "INSERT INTO run_labels (run_id, spec_name, table_name, row_label) "
        "SELECT id, spec_name, table_name, row_label FROM runs"
    )

