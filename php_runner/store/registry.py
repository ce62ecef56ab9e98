"""The run registry: runs, per-epoch metrics, selected results, checkpoints, provenance and audits.

SQLAlchemy 2 ORM over any SQLAlchemy URL; the default is ``sqlite:///registry.db`` in the working
directory, ``$PHP_RUN_DB`` overrides it. Every public method returns plain dataclass snapshots,
never live ORM objects, so callers can keep them after the session closes.

The ORM models below are the current schema; every change to them comes with an Alembic revision in
``php_runner/store/migrations/versions`` (frozen history: each defines the step as it was), applied on
open, so a database of any earlier version upgrades in place. A test compares the models with the
migrated schema, so a model change without its revision fails.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Text,
    delete,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from php_runner.engine.metrics import QueryOutcomes
from php_runner.errors import InputError
from php_runner.store.claims import DEFAULT_STALE_AFTER_S
from php_runner.store.database import (
    BadJSON,
    absent_sqlite,
    check_sqlite_file,
    first_line,
    make_engine,
    read_only_engine,
    refuse_read_only,
    resolve_url,
    shown_url,
    upgrade,
)
from php_runner.store.queue import RunQueue
from php_runner.store.records import (
    AuditRecord,
    CheckpointRecord,
    EpochMetrics,
    RunRecord,
)
from php_runner.store.rows import checked_metrics, damaged_error, run_record
from php_runner.store.tables import (
    AUDIT_SHUFFLED_SOURCE,
    EVALUATION_SOURCE,
    FINAL_TEST_SOURCE,
    PROVENANCE_FIELDS,
    RESUMABLE_STATUSES,
    RULES,
    RUN_KINDS,
    Audit,
    Base,
    Checkpoint,
    EpochMetric,
    Provenance,
    QueryOutcome,
    Result,
    Run,
    RunLabel,
)

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun
    from php_runner.store.records import ResultRow


class Registry(RunQueue):
    """Access to one registry database. Opening it creates or upgrades the schema; the run queue's claims and
    status changes come from ``store.queue.RunQueue``."""

    def __init__(self, url: str | None = None, stale_after: float = DEFAULT_STALE_AFTER_S, read_only: bool = False):
        """``read_only``: open for reading only, creating no file and changing nothing (status, show, table);
        a missing SQLite file then reads as an empty registry (``absent``) and is not created."""
        self.url = resolve_url(url)
        self.stale_after = stale_after
        try:
            if read_only:
                self.engine = read_only_engine(self.url)
            else:
                refuse_read_only(self.url)
                check_sqlite_file(self.url)
                self.engine = make_engine(self.url)
                upgrade(self.engine)
        except InputError:
            raise
        except Exception as err:  # a bad URL or an unreadable file is bad input, named by its URL
            raise InputError(f"registry {shown_url(self.url)}: cannot open ({first_line(err)})") from err
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.absent = read_only and absent_sqlite(self.url)  # read as empty; no file was created

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except BadJSON:
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
                            return damaged_error(self.url, table.name, row_id, f"{column.name} is not valid JSON")
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
                elif row.status in RESUMABLE_STATUSES and "runtime" in planned.config:
                    row.config = {**row.config, "runtime": planned.config["runtime"]}
                s.flush()
                label = select(RunLabel).where(
                    RunLabel.run_id == row.id, RunLabel.spec_name == planned.spec_name,
                    RunLabel.row_label == planned.row_label,
                )
                if s.scalars(label).first() is None:
                    s.add(RunLabel(run_id=row.id, spec_name=planned.spec_name, table_name=planned.table,
                                   row_label=planned.row_label))
                return run_record(row, self.url)
        except IntegrityError:  # another process inserted the same hash between our select and insert
            return self.get_run(planned.config_hash)

    def get_run(self, ref: int | str) -> RunRecord:
        """A run by id or by a unique prefix of its config hash."""
        with self._session() as s:
            key = str(ref).strip()
            if key.isdigit():
                row = s.get(Run, int(key))
                if row is not None:
                    return run_record(row, self.url)
            if not key:
                raise InputError("run: empty run reference")
            rows = s.scalars(select(Run).where(Run.config_hash.startswith(key.lower())).limit(2)).all()
            if not rows:
                raise InputError(f"run {key!r}: no run with this id or config-hash prefix in {shown_url(self.url)}")
            if len(rows) > 1:
                raise InputError(f"run {key!r}: the hash prefix matches several runs; give more characters")
            return run_record(rows[0], self.url)

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
            return [run_record(row, self.url) for row in s.scalars(query)]

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
                             "metrics": checked_metrics(self.url, "results", r.id, r.metrics)} for r in rows}

    def record_outcomes(self, run_id: int, source: str, epoch: int, split: str, outcomes: QueryOutcomes) -> None:
        """Store the per-query outcomes of one evaluation (``tables.QueryOutcome`` names the sources)."""
        key = (QueryOutcome.run_id == run_id, QueryOutcome.source == source, QueryOutcome.epoch == epoch,
               QueryOutcome.split == split)
        with self._session() as s:
            s.execute(delete(QueryOutcome).where(*key))
            s.add(QueryOutcome(run_id=run_id, source=source, epoch=epoch, split=split, data=outcomes.to_bytes()))

    def outcomes(self, run_id: int, source: str, epoch: int, split: str) -> QueryOutcomes | None:
        """The outcomes ``record_outcomes`` stored under this key, or None (e.g. a run recorded before them)."""
        return self._outcomes_of([run_id]).get((run_id, source, epoch, split))

    def _outcomes_of(self, run_ids: Sequence[int]) -> dict[tuple[int, str, int, str], QueryOutcomes]:
        with self._session() as s:
            rows = s.scalars(select(QueryOutcome).where(QueryOutcome.run_id.in_(list(run_ids))))
            return {(r.run_id, r.source, r.epoch, r.split): QueryOutcomes.from_bytes(
                        r.data, f"registry {shown_url(self.url)}, table query_outcomes, row {r.id}") for r in rows}

    def record_checkpoint(self, run_id: int, path: str, sha256: str, epoch: int | None, role: str) -> None:
        with self._session() as s:
            s.execute(delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.role == role))
            s.add(Checkpoint(run_id=run_id, role=role, path=str(path), sha256=sha256, epoch=epoch))

    def checkpoint_owners(self) -> list[tuple[int, CheckpointRecord]]:
        """``(run id, checkpoint)`` for every recorded checkpoint (outputs must not overwrite them)."""
        with self._session() as s:
            rows = s.scalars(select(Checkpoint).order_by(Checkpoint.id))
            return [(r.run_id, CheckpointRecord(r.role, r.path, r.sha256, r.epoch)) for r in rows]

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
                raise damaged_error(self.url, "provenance", row.id, "extra is not a mapping")
            return {**{k: getattr(row, k) for k in PROVENANCE_FIELDS}, "recorded_at": row.recorded_at, **row.extra}

    def record_audit(self, run_id: int, report: dict, outcomes: dict[str, QueryOutcomes] | None = None) -> AuditRecord:
        """Store an audit report and its test evaluations' per-query outcomes by source (epoch 0, split test)."""
        with self._session() as s:
            row = Audit(run_id=run_id, report=report, created_at=time.time())
            s.add(row)
            s.flush()
            record = AuditRecord(row.id, row.run_id, row.report, row.created_at)
        for source, per_query in (outcomes or {}).items():
            self.record_outcomes(run_id, source, 0, "test", per_query)
        return record

    def latest_audit(self, run_id: int) -> AuditRecord | None:
        with self._session() as s:
            row = s.scalars(
                select(Audit).where(Audit.run_id == run_id).order_by(Audit.created_at.desc(), Audit.id.desc())
            ).first()
            return None if row is None else AuditRecord(row.id, row.run_id, row.report, row.created_at)

    # ---- tables -----------------------------------------------------------------------------

    def result_rows(self, table: str | None = None, preset: str | None = None,
                    accept: Callable[[RunRecord, str], bool] | None = None) -> list["ResultRow"]:
        """One ``reports.ResultRow`` per (done run, label, recorded rule), optionally for one table.

        With ``preset``, runs of other presets are left out (imported runs are always kept: they are
        released checkpoints, shown on lines of their own), so a table never averages a tiny-preset
        run with a paper-scale one. ``forced_test`` marks tuning trials that selected on the test
        split: their settings were chosen by test labels. ``accept(run, row_label)``, when given, keeps
        only the (run, label) pairs it returns True for (``reports.recipes.CellFilter``: a cell's recipe).
        """
        from php_runner.store.records import ResultRow

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
            records = {run.id: run_record(run, self.url) for run, _, _ in triples}
            # Every row read is checked, also those of runs no cell accepts: a damaged registry is named.
            metrics = {result.id: checked_metrics(self.url, "results", result.id, result.metrics)
                       for _, _, result in triples}
            if accept is not None:
                verdicts = {(run.id, label.row_label): accept(records[run.id], label.row_label)
                            for run, label, _ in triples}
                triples = [(run, label, result) for run, label, result in triples
                           if verdicts[(run.id, label.row_label)]]
        # After the session: _outcomes_of opens its own, and SQLite sessions begin IMMEDIATE.
        outcomes = self._outcomes_of(run_ids) if run_ids else {}
        return [
            ResultRow(
                table=label.table_name, spec_name=label.spec_name, row_label=label.row_label,
                dataset=run.dataset, seed=run.seed, rule=result.rule,
                metrics=metrics[result.id],
                kind=run.kind, audit=audits.get(run.id),
                forced_test=run.kind == "trial"
                and records[run.id].config.get("train", {}).get("selection") == "test",
                run_id=run.id,
                outcomes=outcomes.get((run.id, FINAL_TEST_SOURCE if result.rule == FINAL_TEST_SOURCE
                                       else EVALUATION_SOURCE, result.epoch, result.split)),
                shuffled_outcomes=outcomes.get((run.id, AUDIT_SHUFFLED_SOURCE.format(seed=0), 0, "test")),
            )
            for run, label, result in triples
        ]
