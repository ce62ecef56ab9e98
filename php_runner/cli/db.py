"""``php-run db upgrade|current|history``: the registry's schema revision, by hand.

Every other command upgrades the registry it opens by itself; these are for seeing where a database
stands and for upgrading one deliberately (for example a shared PostgreSQL registry before a sweep).
"""

from __future__ import annotations

import typer

from php_runner.cli import app
from php_runner.cli.common import DbOption, console

db_app = typer.Typer(help="Show or upgrade the registry's schema revision (Alembic migrations shipped with php-run).",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command()
def upgrade(db: DbOption = None) -> None:
    """Upgrade the registry to this php-run's newest schema revision (other commands do it on open too).

    Example: php-run db upgrade --db postgresql+psycopg://user:password@host/php_run
    """
    from php_runner.store.registry import Registry
    from php_runner.store.database import resolve_url, stored_revision

    before = stored_revision(db)
    registry = Registry(db)
    registry.close()
    after = stored_revision(db)
    change = "already at" if before == after else f"upgraded from {before or 'an empty database'} to"
    console.print(f"registry {resolve_url(db)}: {change} revision {after}")


@db_app.command()
def current(db: DbOption = None) -> None:
    """Print the registry's schema revision and this php-run's newest one, changing nothing.

    Example: php-run db current
    """
    from php_runner.store.database import head_revision, resolve_url, stored_revision

    revision = stored_revision(db)
    state = "up to date" if revision == head_revision() else f"php-run upgrades it to {head_revision()} on open"
    console.print(f"registry {resolve_url(db)}: revision {revision or 'none (empty or absent)'} ({state})")


@db_app.command()
def history() -> None:
    """List the schema revisions this php-run ships, oldest first.

    Example: php-run db history
    """
    from php_runner.store.database import head_revision, revision_history

    for revision, description in revision_history():
        marker = "  (head)" if revision == head_revision() else ""
        console.print(f"{revision}  {description}{marker}", highlight=False)
