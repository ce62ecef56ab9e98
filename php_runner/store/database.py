"""Opening a registry database: URLs, engines (SQLite and PostgreSQL), schema checks and Alembic upgrades."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from php_runner.errors import InputError
from php_runner.store.tables import Base

if TYPE_CHECKING:
    pass


DEFAULT_URL = "sqlite:///registry.db"
URL_ENV = "PHP_RUN_DB"
SQLITE_BUSY_TIMEOUT_MS = 60_000


def shown_url(url) -> str:
    """``url`` as it may be printed: the password of a server URL replaced by ***."""
    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:  # not parseable as a URL: nothing to hide that we could find
        return str(url)


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``$PHP_RUN_DB``, else the default SQLite file in the working directory."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Before Alembic, the registry counted its schema versions in a table of its own; version N is
# revision 000N (the revisions replay exactly those steps), so such a database is stamped and carries on.
LEGACY_VERSION_TABLE = "schema_version"
# Not Alembic's default name: Optuna keeps its own Alembic revision in ``alembic_version`` of the same
# database (tuning studies live in the registry database).
VERSION_TABLE = "php_run_schema_revision"
# Serialises concurrent first openers of one PostgreSQL database (SQLite's BEGIN IMMEDIATE does that there).
PG_MIGRATION_LOCK = 0x7068_7072_756E  # "phprun"


def _alembic_config(conn: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    """The newest schema revision this php-run knows."""
    return _scripts().get_current_head()


def revision_history() -> list[tuple[str, str]]:
    """``(revision, first line of its description)`` for every revision, oldest first."""
    revisions = reversed(list(_scripts().walk_revisions()))
    return [(r.revision, (r.doc or "").strip().splitlines()[0] if r.doc else "") for r in revisions]


def current_revision(conn: Connection) -> str | None:
    """The revision recorded in the database (a legacy version table counts); None when empty."""
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    if LEGACY_VERSION_TABLE in tables:
        version = conn.execute(text(f"SELECT MAX(version) FROM {LEGACY_VERSION_TABLE}")).scalar() or 0
        return f"{version:04d}" if version else None
    return None


def upgrade(engine: Engine, target: str = "head") -> str:
    """Bring the database to ``target`` (the head revision by default); returns the revision reached.

    One write transaction (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL), so concurrent
    openers serialise and the later ones find the work done. A database from a newer php-run, or
    one holding tables that are not a registry's, is refused untouched.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        tables = set(inspect(conn).get_table_names())
        current = current_revision(conn)
        _check_known(engine.url, tables, current)
        if LEGACY_VERSION_TABLE in tables:
            command.stamp(_alembic_config(conn), current)
            conn.execute(text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))
        if current != head_revision() or target != "head":
            command.upgrade(_alembic_config(conn), target)
        reached = current_revision(conn)
        if target == "head":
            _check_tables(engine.url, conn, reached)
    return reached


def stored_revision(url: str | None = None) -> str | None:
    """The revision of the database at ``url`` without changing it; None when it is absent or empty."""
    url = resolve_url(url)
    try:
        check_sqlite_file(url)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
            return None
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return current_revision(conn)
        finally:
            engine.dispose()
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"registry {shown_url(url)}: cannot open ({first_line(err)})") from err


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _check_known(url: object, tables: set[str], revision: str | None) -> None:
    """Refuse a database that is not a php-run registry, or one written by a newer php-run."""
    if revision is None and tables - {VERSION_TABLE}:
        raise InputError(
            f"registry {shown_url(url)}: not a php-run registry (it holds the tables {', '.join(sorted(tables))}); "
            "give an empty or new file with --db"
        )
    if revision is not None:
        try:
            _scripts().get_revision(revision)
        except AlembicError:
            raise InputError(
                f"registry {shown_url(url)}: schema revision {revision} is newer than this php-run "
                f"(it knows up to {head_revision()}); upgrade php-run"
            ) from None


def _check_tables(url: object, conn: Connection, revision: str | None) -> None:
    """Every table and column of the models exists: a damaged database is named, not a traceback later."""
    inspector = inspect(conn)
    present = set(inspector.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in present:
            raise InputError(f"registry {shown_url(url)}: table {table.name} is missing (schema revision {revision}); "
                             "the database is damaged")
        missing = set(table.columns.keys()) - {c["name"] for c in inspector.get_columns(table.name)}
        if missing:
            raise InputError(f"registry {shown_url(url)}: table {table.name} lacks the columns {', '.join(sorted(missing))} "
                             f"(schema revision {revision}); the database is damaged")


def check_sqlite_file(url: str) -> None:
    """Look at an existing SQLite registry read-only, before the engine switches it to WAL: a foreign
    or newer database must be refused with its bytes unchanged."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    path = Path(parsed.database)
    if not path.is_file() or path.stat().st_size == 0:
        return
    options = "mode=ro" if writable_sqlite(path) else "mode=ro&immutable=1"  # WAL: -shm cannot be made
    engine = create_engine(f"sqlite:///{path.resolve().as_uri()}?{options}&uri=true")
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            revision = current_revision(conn)
    except DBAPIError as err:
        raise InputError(f"registry {shown_url(url)}: cannot open ({first_line(err.orig)})") from err
    finally:
        engine.dispose()
    _check_known(url, tables, revision)


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL; None for a server URL or an in-memory database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def writable_sqlite(path: Path) -> bool:
    """The file and its folder can be written (SQLite also writes -wal/-shm/-journal files beside it)."""
    folder = path.resolve().parent
    return os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def absent_sqlite(url: str) -> bool:
    """An SQLite URL whose file does not exist yet or is empty: a new registry, nothing recorded."""
    path = sqlite_file(url)
    return path is not None and (not path.is_file() or path.stat().st_size == 0)


def read_only_engine(url: str) -> Engine:
    """An engine that only reads, creating no file: an absent SQLite file reads as an empty registry (in
    memory); one that cannot be written (read-only file system or permissions) is opened immutable, since
    WAL mode would need to create its -shm file. The schema must be the current one (reading never upgrades)."""
    path = sqlite_file(url)
    if path is not None and not path.resolve().parent.is_dir():
        raise InputError(f"registry {shown_url(url)}: cannot open (the folder {path.parent} does not exist)")
    if absent_sqlite(url):
        return _empty_registry_engine()
    if path is not None:
        check_sqlite_file(url)
        options = "mode=ro" if writable_sqlite(path) else "mode=ro&immutable=1"
        engine = create_engine(f"sqlite:///{path.resolve().as_uri()}?{options}&uri=true", json_deserializer=load_json)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql("BEGIN")  # one consistent snapshot per read
    else:
        engine = make_engine(url)
    with engine.connect() as conn:
        revision = current_revision(conn)
        tables = set(inspect(conn).get_table_names())
        _check_known(engine.url, tables, revision)
        if revision is None:  # an empty server database: nothing recorded yet
            engine.dispose()
            return _empty_registry_engine()
        if revision != head_revision():
            engine.dispose()
            raise InputError(f"registry {shown_url(url)}: schema revision {revision} is older than this php-run's "
                             f"({head_revision()}); run php-run db upgrade where the registry is writable")
        _check_tables(engine.url, conn, revision)
    return engine


def _empty_registry_engine() -> Engine:
    """An empty registry in memory: what reading a registry that does not exist yet finds."""
    engine = make_engine("sqlite://")
    upgrade(engine)
    return engine


def refuse_read_only(url: str) -> None:
    """A writing command on an SQLite registry that cannot be written: one line, before SQLite's own error."""
    path = sqlite_file(url)
    if path is not None and path.resolve().parent.is_dir() and not writable_sqlite(path):
        folder = path.resolve().parent
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        why = "on a read-only file system" if read_only else "not writable (permissions)"
        raise InputError(f"registry {path}: {why}; reading commands (status, show, table) work, this one writes: "
                         "copy the registry somewhere writable and give --db")


def make_engine(url: str) -> Engine:
    engine = create_engine(url, json_deserializer=load_json)
    if engine.dialect.name == "sqlite":
        # WAL lets readers (status, table) work while a worker writes; the busy timeout makes writers
        # queue instead of failing. pysqlite's own transaction handling is switched off so that every
        # transaction starts with BEGIN IMMEDIATE: it takes the write lock up front, which avoids the
        # read-then-write upgrade failures of deferred transactions under concurrency.
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class BadJSON(ValueError):
    """A stored JSON value that does not parse; the registry then finds its row (see ``_session``)."""


def load_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as err:
        raise BadJSON(str(err)) from None
