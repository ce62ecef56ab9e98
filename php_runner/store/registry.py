"""The run registry: runs, per-epoch metrics, selected results, checkpoints, provenance and audits.

SQLAlchemy 2 ORM over any SQLAlchemy URL; the default is ``sqlite:///registry.db`` in the working
directory, ``$PHP_RUN_DB`` overrides it. Every public method returns plain dataclass snapshots,
never live ORM objects, so callers can keep them after the session closes.

The ORM models below are the current schema; every change to them comes with an Alembic revision in
``php_runner/migrations/versions`` (frozen history: each defines the step as it was), applied on
open, so a database of any earlier version upgrades in place. A test compares the models with the
migrated schema, so a model change without its revision fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from php_runner.errors import InputError

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun
    from php_runner.reports.tables import ResultRow

DEFAULT_URL = "sqlite:///registry.db"
URL_ENV = "PHP_RUN_DB"
RUN_KINDS = ("trained", "imported", "trial")
RUN_STATUSES = ("queued", "running", "done", "failed")
# final-test: test metrics of the selected checkpoint computed once after training (tuning trials,
# which never evaluate test while they train).
RULES = ("best-on-test", "best-on-val", "last", "final-test")
# A running run whose worker has not written a heartbeat for this long is considered dead.
DEFAULT_STALE_AFTER_S = 120.0
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


def this_worker() -> str:
    """The worker id of the calling process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------------------------
# ORM model: the current schema
# --------------------------------------------------------------------------------------------


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


PROVENANCE_FIELDS = (
    "git_commit", "git_dirty", "python", "torch", "torchvision", "php_run", "device", "host", "command",
)

# --------------------------------------------------------------------------------------------
# Migrations: Alembic revisions in php_runner/migrations/versions, applied on open
# --------------------------------------------------------------------------------------------

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
        _check_sqlite_file(url)
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
        raise InputError(f"registry {shown_url(url)}: cannot open ({_first_line(err)})") from err


def _first_line(err: Exception) -> str:
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


def _check_sqlite_file(url: str) -> None:
    """Look at an existing SQLite registry read-only, before the engine switches it to WAL: a foreign
    or newer database must be refused with its bytes unchanged."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    path = Path(parsed.database)
    if not path.is_file() or path.stat().st_size == 0:
        return
    engine = create_engine(f"sqlite:///{path.resolve().as_uri()}?mode=ro&uri=true")
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            revision = current_revision(conn)
    except DBAPIError as err:
        raise InputError(f"registry {shown_url(url)}: cannot open ({_first_line(err.orig)})") from err
    finally:
        engine.dispose()
    _check_known(url, tables, revision)


def _make_engine(url: str) -> Engine:
    engine = create_engine(url, json_deserializer=_load_json)
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


# --------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------


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


class _BadJSON(ValueError):
    """A stored JSON value that does not parse; the registry then finds its row (see ``_session``)."""


def _load_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as err:
        raise _BadJSON(str(err)) from None


def _damaged(url: object, table: str, row_id: int, problem: str) -> InputError:
    return InputError(f"registry {shown_url(url)}: table {table}, row {row_id}: {problem}; the database is damaged")


def _checked_metrics(url: object, table: str, row_id: int, value: Any) -> dict[str, float]:
    """Stored R1..mINP values: a mapping of names to finite numbers."""
    if not isinstance(value, dict):
        raise _damaged(url, table, row_id, f"metrics is {type(value).__name__}, not a mapping of names to numbers")
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise _damaged(url, table, row_id, f"metric {name} is {number!r}, not a finite number")
    return {name: float(number) for name, number in value.items()}


def _run_record(row: Run, url: object) -> RunRecord:
    if row.status not in RUN_STATUSES:
        raise _damaged(url, "runs", row.id, f"status {row.status!r} is not one of {', '.join(RUN_STATUSES)}")
    if row.kind not in RUN_KINDS:
        raise _damaged(url, "runs", row.id, f"kind {row.kind!r} is not one of {', '.join(RUN_KINDS)}")
    if not isinstance(row.config, dict):
        raise _damaged(url, "runs", row.id, f"config is {type(row.config).__name__}, not a mapping")
    return RunRecord(
        id=row.id, config_hash=row.config_hash, config=row.config, kind=row.kind, dataset=row.dataset,
        spec_name=row.spec_name, table=row.table_name, row_label=row.row_label, seed=row.seed,
        preset=row.preset, status=row.status, error=row.error, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at, worker=row.worker,
        heartbeat_at=row.heartbeat_at, attempts=row.attempts, run_dir=row.run_dir, executor=row.executor,
        job_id=row.job_id,
    )


def _claimable(now: float, stale_after: float):
    """The SQL part of the claimable rule: queued, failed, or running with a stale heartbeat."""
    return or_(
        Run.status.in_(("queued", "failed")),
        (Run.status == "running") & (Run.heartbeat_at < now - stale_after),
    )


def _claim_values(worker: str, now: float) -> dict[str, Any]:
    return dict(status="running", worker=worker, heartbeat_at=now, started_at=now, finished_at=None,
                error=None, attempts=Run.attempts + 1)


def _pid_is_dead(worker: str | None) -> bool:
    """True when ``worker`` names a process on this host that no longer exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    """A killed process whose parent died too may wait unreaped (as a zombie) for a long time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (not Linux), or it just vanished
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class Registry:
    """Access to one registry database. Opening it creates or upgrades the schema."""

    def __init__(self, url: str | None = None, stale_after: float = DEFAULT_STALE_AFTER_S):
        self.url = resolve_url(url)
        self.stale_after = stale_after
        try:
            _check_sqlite_file(self.url)
            self.engine = _make_engine(self.url)
            upgrade(self.engine)
        except InputError:
            raise
        except Exception as err:  # a bad URL or an unreadable file is bad input, named by its URL
            raise InputError(f"registry {shown_url(self.url)}: cannot open ({_first_line(err)})") from err
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except _BadJSON:
            raise self._locate_bad_json() from None

    def _locate_bad_json(self) -> InputError:
        """The first stored JSON value that does not parse, named by table, row and column."""
        with self.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                for column in (c for c in table.columns if isinstance(c.type, JSON)):
                    for row_id, value in conn.execute(select(table.c.id, column.cast(Text))):
                        try:
                            json.loads(value)
                        except (TypeError, ValueError):
                            return _damaged(self.url, table.name, row_id, f"{column.name} is not valid JSON")
        return InputError(f"registry {shown_url(self.url)}: a stored JSON value does not parse; the database is damaged")

    # ---- runs -------------------------------------------------------------------------------

    def plan_run(self, planned: "PlannedRun", kind: str = "trained") -> RunRecord:
        """Insert ``planned`` as a queued run when its hash is new, else return the existing run.

        Either way the run gets ``planned``'s label (spec, table, row), so a config planned by several
        specs fills a cell in each of their tables. An existing run that is not done and not running
        takes the new ``runtime`` section (data root, weights, device): it is outside the hash, and the
        latest invocation knows where the data lives now. The returned record keeps the labels of
        the run's first planning.
        """
        if kind not in RUN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        try:
            with self._session() as s:
                row = s.scalars(select(Run).where(Run.config_hash == planned.config_hash)).one_or_none()
                if row is None:
                    row = Run(
                        config_hash=planned.config_hash, config=planned.config, kind=kind,
                        dataset=planned.dataset, spec_name=planned.spec_name, table_name=planned.table,
                        row_label=planned.row_label, seed=planned.seed, preset=planned.preset,
                        status="queued", created_at=time.time(), attempts=0,
                    )
                    s.add(row)
                elif row.status in ("queued", "failed") and "runtime" in planned.config:
                    row.config = {**row.config, "runtime": planned.config["runtime"]}
                s.flush()
                label = select(RunLabel).where(
                    RunLabel.run_id == row.id, RunLabel.spec_name == planned.spec_name,
                    RunLabel.row_label == planned.row_label,
                )
                if s.scalars(label).first() is None:
                    s.add(RunLabel(run_id=row.id, spec_name=planned.spec_name, table_name=planned.table,
                                   row_label=planned.row_label))
                return _run_record(row, self.url)
        except IntegrityError:  # another process inserted the same hash between our select and insert
            return self.get_run(planned.config_hash)

    def claim_run(self, run_id: int, worker: str, stale_after: float | None = None) -> bool:
        """Atomically make ``worker`` the owner of a queued, failed or abandoned running run.

        A running run is abandoned when its heartbeat is older than ``stale_after`` seconds, or when
        its worker was a process on this host that no longer exists (killed, crashed). One UPDATE
        with the claimable condition in its WHERE clause decides; exactly one concurrent caller sees
        a changed row.
        """
        stale_after = self.stale_after if stale_after is None else stale_after
        now = time.time()
        claimable = _claimable(now, stale_after)
        current = self.get_run(run_id)
        if current.status == "running" and _pid_is_dead(current.worker):
            # Compare-and-swap on the dead owner's identity: a concurrent claimer changes it first.
            claimable = or_(
                claimable,
                (Run.status == "running") & (Run.worker == current.worker)
                & (Run.heartbeat_at == current.heartbeat_at),
            )
        with self._session() as s:
            result = s.execute(
                update(Run).where(Run.id == run_id, claimable).values(**_claim_values(worker, now))
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def claim_next(
        self, worker: str, stale_after: float | None = None, run_ids: Sequence[int] | None = None
    ) -> RunRecord | None:
        """Atomically claim the oldest claimable run (the rule of ``claim_run``) among ``run_ids``.

        ``run_ids=None`` means any run; imported runs are never claimed (they never train). On PostgreSQL
        the candidate row is selected ``FOR UPDATE SKIP LOCKED``, so concurrent workers take
        different runs without waiting on each other; on SQLite the transaction is ``BEGIN
        IMMEDIATE`` (see ``_make_engine``), which serialises claimers. Runs held by a dead local
        process are claimed through ``claim_run``'s compare-and-swap. Returns the claimed run, or
        None when nothing is claimable.
        """
        if run_ids is not None and not run_ids:
            return None
        stale_after = self.stale_after if stale_after is None else stale_after
        scope = [Run.kind.in_(("trained", "trial"))] + ([] if run_ids is None else [Run.id.in_(list(run_ids))])
        now = time.time()
        with self._session() as s:
            candidate = s.scalars(
                select(Run.id).where(*scope, _claimable(now, stale_after)).order_by(Run.id).limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is not None:
                s.execute(update(Run).where(Run.id == candidate).values(**_claim_values(worker, now))
                          .execution_options(synchronize_session=False))
                return _run_record(s.get(Run, candidate), self.url)
            orphans = s.execute(
                select(Run.id, Run.worker).where(*scope, Run.status == "running").order_by(Run.id)
            ).all()
        for run_id, owner in orphans:
            if _pid_is_dead(owner) and self.claim_run(run_id, worker, stale_after):
                return self.get_run(run_id)
        return None

    def set_job(self, run_id: int, executor: str | None, job_id: str | None) -> None:
        """Record the executor (``local``, ``slurm``) and job id that will run, or runs, ``run_id``."""
        with self._session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(executor=executor, job_id=job_id))

    def requeue(self, run_id: int, worker: str | None = None) -> bool:
        """Put a running run back in the queue (preempted, cancelled); with ``worker``, only its own.

        The run directory stays, so the next claimer resumes from its last checkpoint.
        """
        condition = [Run.id == run_id, Run.status == "running"]
        if worker is not None:
            condition.append(Run.worker == worker)
        with self._session() as s:
            result = s.execute(
                update(Run).where(*condition).values(status="queued", worker=None, heartbeat_at=None)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def is_claimable(self, run: RunRecord, stale_after: float | None = None) -> bool:
        """Whether ``claim_run`` would currently succeed for ``run`` (a hint; claim_run decides)."""
        stale_after = self.stale_after if stale_after is None else stale_after
        if run.status in ("queued", "failed"):
            return True
        if run.status != "running":
            return False
        stale = run.heartbeat_at is None or run.heartbeat_at < time.time() - stale_after
        return stale or _pid_is_dead(run.worker)

    def heartbeat(self, run_id: int, worker: str) -> bool:
        """Refresh the heartbeat; False when ``worker`` no longer owns the running run."""
        with self._session() as s:
            result = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.worker == worker, Run.status == "running")
                .values(heartbeat_at=time.time())
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def set_run_dir(self, run_id: int, run_dir: str) -> None:
        with self._session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(run_dir=run_dir))

    def mark_done(self, run_id: int) -> None:
        with self._session() as s:
            s.execute(
                update(Run).where(Run.id == run_id).values(status="done", error=None, finished_at=time.time())
            )

    def mark_failed(self, run_id: int, error: str, worker: str | None = None) -> bool:
        """Record a failure. With ``worker``, only while that worker still owns the running run."""
        condition = [Run.id == run_id]
        if worker is not None:
            condition += [Run.worker == worker, Run.status == "running"]
        with self._session() as s:
            result = s.execute(
                update(Run).where(*condition).values(status="failed", error=error, finished_at=time.time())
            )
            return result.rowcount == 1

    def get_run(self, ref: int | str) -> RunRecord:
        """A run by id or by a unique prefix of its config hash."""
        with self._session() as s:
            key = str(ref).strip()
            if key.isdigit():
                row = s.get(Run, int(key))
                if row is not None:
                    return _run_record(row, self.url)
            if not key:
                raise InputError("run: empty run reference")
            rows = s.scalars(select(Run).where(Run.config_hash.startswith(key.lower())).limit(2)).all()
            if not rows:
                raise InputError(f"run {key!r}: no run with this id or config-hash prefix in {shown_url(self.url)}")
            if len(rows) > 1:
                raise InputError(f"run {key!r}: the hash prefix matches several runs; give more characters")
            return _run_record(rows[0], self.url)

    def list_runs(
        self,
        *,
        status: str | Iterable[str] | None = None,
        kind: str | Iterable[str] | None = None,
        dataset: str | None = None,
        spec_name: str | None = None,
        table: str | None = None,
        preset: str | None = None,
        config_hashes: Iterable[str] | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, in id order; ``spec_name`` and ``table`` match any label."""
        query = select(Run).order_by(Run.id)
        for column, value in ((Run.status, status), (Run.kind, kind)):
            if value is not None:
                query = query.where(column.in_([value] if isinstance(value, str) else list(value)))
        for column, value in ((Run.dataset, dataset), (Run.preset, preset)):
            if value is not None:
                query = query.where(column == value)
        for column, value in ((RunLabel.spec_name, spec_name), (RunLabel.table_name, table)):
            if value is not None:
                query = query.where(select(RunLabel.id).where(RunLabel.run_id == Run.id, column == value).exists())
        if config_hashes is not None:
            query = query.where(Run.config_hash.in_(list(config_hashes)))
        with self._session() as s:
            return [_run_record(row, self.url) for row in s.scalars(query)]

    # ---- metrics and results ----------------------------------------------------------------

    def record_epoch(self, run_id: int, epoch: int, split: str, metrics: dict[str, float]) -> None:
        """Store one epoch's values for ``split``, replacing any earlier values (a resumed epoch)."""
        with self._session() as s:
            s.execute(
                delete(EpochMetric).where(
                    EpochMetric.run_id == run_id, EpochMetric.epoch == epoch, EpochMetric.split == split
                )
            )
            s.add_all(
                EpochMetric(run_id=run_id, epoch=epoch, split=split, name=name, value=float(value))
                for name, value in metrics.items()
            )

    def epochs(self, run_id: int) -> list[EpochMetrics]:
        """Per-epoch values, ordered by epoch then split."""
        query = (
            select(EpochMetric)
            .where(EpochMetric.run_id == run_id)
            .order_by(EpochMetric.epoch, EpochMetric.split, EpochMetric.id)
        )
        grouped: dict[tuple[int, str], dict[str, float]] = {}
        with self._session() as s:
            for row in s.scalars(query):
                grouped.setdefault((row.epoch, row.split), {})[row.name] = row.value
        return [EpochMetrics(epoch, split, values) for (epoch, split), values in grouped.items()]

    def record_result(self, run_id: int, rule: str, epoch: int, split: str, metrics: dict[str, float]) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        with self._session() as s:
            s.execute(delete(Result).where(Result.run_id == run_id, Result.rule == rule))
            s.add(Result(run_id=run_id, rule=rule, epoch=epoch, split=split,
                         metrics={k: float(v) for k, v in metrics.items()}))

    def results(self, run_id: int) -> dict[str, dict]:
        """``{rule: {"epoch": e, "split": s, "metrics": {R1, R5, R10, mAP, mINP}}}``."""
        with self._session() as s:
            rows = s.scalars(select(Result).where(Result.run_id == run_id).order_by(Result.id))
            return {r.rule: {"epoch": r.epoch, "split": r.split,
                             "metrics": _checked_metrics(self.url, "results", r.id, r.metrics)} for r in rows}

    def record_checkpoint(self, run_id: int, path: str, sha256: str, epoch: int | None, role: str) -> None:
        with self._session() as s:
            s.execute(delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.role == role))
            s.add(Checkpoint(run_id=run_id, role=role, path=str(path), sha256=sha256, epoch=epoch))

    def checkpoints(self, run_id: int) -> list[CheckpointRecord]:
        with self._session() as s:
            rows = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.id))
            return [CheckpointRecord(r.role, r.path, r.sha256, r.epoch) for r in rows]

    def record_provenance(self, run_id: int, info: dict[str, Any]) -> None:
        """Store where and with what a run executed; keys outside ``PROVENANCE_FIELDS`` go to ``extra``."""
        known = {k: info.get(k) for k in PROVENANCE_FIELDS}
        extra = {k: v for k, v in info.items() if k not in PROVENANCE_FIELDS}
        with self._session() as s:
            s.execute(delete(Provenance).where(Provenance.run_id == run_id))
            s.add(Provenance(run_id=run_id, recorded_at=time.time(), extra=extra, **known))

    def provenance(self, run_id: int) -> dict[str, Any] | None:
        with self._session() as s:
            row = s.scalars(select(Provenance).where(Provenance.run_id == run_id)).one_or_none()
            if row is None:
                return None
            if not isinstance(row.extra, dict):
                raise _damaged(self.url, "provenance", row.id, "extra is not a mapping")
            return {**{k: getattr(row, k) for k in PROVENANCE_FIELDS}, "recorded_at": row.recorded_at, **row.extra}

    def record_audit(self, run_id: int, report: dict) -> AuditRecord:
        with self._session() as s:
            row = Audit(run_id=run_id, report=report, created_at=time.time())
            s.add(row)
            s.flush()
            return AuditRecord(row.id, row.run_id, row.report, row.created_at)

    def latest_audit(self, run_id: int) -> AuditRecord | None:
        with self._session() as s:
            row = s.scalars(
                select(Audit).where(Audit.run_id == run_id).order_by(Audit.created_at.desc(), Audit.id.desc())
            ).first()
            return None if row is None else AuditRecord(row.id, row.run_id, row.report, row.created_at)

    # ---- tables -----------------------------------------------------------------------------

    def result_rows(self, table: str | None = None, preset: str | None = None) -> list["ResultRow"]:
        """One ``reports.ResultRow`` per (done run, label, recorded rule), optionally for one table.

        With ``preset``, runs of other presets are left out (imported runs are always kept: they are
        released checkpoints, shown on lines of their own), so a table never averages a tiny-preset
        run with a paper-scale one. ``forced_test`` marks tuning trials that selected on the test
        split: their settings were chosen by test labels.
        """
        from php_runner.reports.tables import ResultRow

        query = (
            select(Run, RunLabel, Result)
            .join(RunLabel, RunLabel.run_id == Run.id)
            .join(Result, Result.run_id == Run.id)
            .where(Run.status == "done")
            .order_by(Run.id, RunLabel.id, Result.id)
        )
        if table is not None:
            query = query.where(RunLabel.table_name == table)
        if preset is not None:
            query = query.where((Run.preset == preset) | (Run.kind == "imported"))
        with self._session() as s:
            triples = s.execute(query).all()
            audits: dict[int, dict] = {}
            run_ids = sorted({run.id for run, _, _ in triples})
            if run_ids:
                for audit in s.scalars(
                    select(Audit).where(Audit.run_id.in_(run_ids)).order_by(Audit.created_at, Audit.id)
                ):
                    audits[audit.run_id] = audit.report  # ascending order: the latest wins
            records = {run.id: _run_record(run, self.url) for run, _, _ in triples}
            return [
                ResultRow(
                    table=label.table_name, spec_name=label.spec_name, row_label=label.row_label,
                    dataset=run.dataset, seed=run.seed, rule=result.rule,
                    metrics=_checked_metrics(self.url, "results", result.id, result.metrics),
                    kind=run.kind, audit=audits.get(run.id),
                    forced_test=run.kind == "trial"
                    and records[run.id].config.get("train", {}).get("selection") == "test",
                )
                for run, label, result in triples
            ]
