"""Schema version 4: the executor (local, slurm) and job id of the worker a queued run went to.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("executor", sa.String(32)))
        batch.add_column(sa.Column("job_id", sa.String(128)))

