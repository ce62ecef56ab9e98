"""Alembic environment for the registry: always run on a connection the caller already opened.

``php_runner.store.registry`` passes its open connection (inside its write transaction) as
``config.attributes["connection"]``; there is no ``alembic.ini`` and no URL of its own, so the
migrations run exactly where and when the registry decides. SQLite gets batch mode, the way
Alembic rewrites tables for SQLite's limited ``ALTER TABLE``.
"""

from alembic import context

from php_runner.store.database import VERSION_TABLE
from php_runner.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
