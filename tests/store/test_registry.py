"""Registry round trips, atomic claims, the run queue, stale-run recovery and schema migrations.

Every test runs against SQLite and, when ``$PHP_RUN_TEST_PG_URL`` names a server, PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    inspect,
    select,
    text,
)

from php_runner.errors import InputError
from php_runner.store.database import VERSION_TABLE, current_revision, head_revision, resolve_url, revision_history, upgrade
from php_runner.store.tables import Base
from php_runner.store.registry import Registry
from php_runner.experiment.schema import PlannedRun

METRICS = {"R1": 61.5, "R5": 80.25, "R10": 86.0, "mAP": 55.5, "mINP": 40.125}


def planned(seed: int = 1, *, config_hash: str | None = None, table: str | None = "cnum", row: str = "9",
            data_root: str = "data") -> PlannedRun:
    config = {"model": {"cnum": 9}, "train": {"seed": seed, "selection": "test"},
              "data": {"dataset": "CUHK-PEDES"}, "runtime": {"data_root": data_root}}
    return PlannedRun(config=config, config_hash=config_hash or f"{seed:02d}" + "ab" * 31, spec_name="cnum",
                      table=table, row_label=row, dataset="CUHK-PEDES", seed=seed, preset="tiny")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def registry_url(request, tmp_path) -> str:
    """A fresh registry database of each backend (overrides the SQLite-only conftest fixture)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def registry(registry_url):
    reg = Registry(registry_url)
    yield reg
    reg.close()


def test_plan_run_inserts_once_and_returns_the_existing_run(registry):
    first = registry.plan_run(planned())
    again = registry.plan_run(planned())
    assert first.status == "queued" and first.kind == "trained" and first.attempts == 0
    assert again.id == first.id
    assert [r.id for r in registry.list_runs()] == [first.id]
    other = registry.plan_run(planned(seed=2), kind="trial")
    assert other.id != first.id and other.kind == "trial"
    with pytest.raises(ValueError):
        registry.plan_run(planned(seed=3), kind="nonsense")


def test_plan_run_takes_the_new_runtime_only_for_runs_not_done(registry):
    run = registry.plan_run(planned(data_root="old"))
    assert registry.plan_run(planned(data_root="new")).config["runtime"]["data_root"] == "new"
    registry.mark_done(run.id)
    assert registry.plan_run(planned(data_root="newer")).config["runtime"]["data_root"] == "new"


def test_everything_recorded_reads_back_as_snapshots(registry):
    run = registry.plan_run(planned())
    registry.record_epoch(run.id, 1, "train", {"total": 3.5, "lr": 1e-3})
    registry.record_epoch(run.id, 1, "test", METRICS)
    registry.record_epoch(run.id, 1, "train", {"total": 2.5, "lr": 2e-3})  # a resumed epoch replaces its values
    registry.record_result(run.id, "best-on-test", 1, "test", METRICS)
    registry.record_result(run.id, "last", 1, "test", {**METRICS, "R1": 1.0})
    registry.record_checkpoint(run.id, "/ckpt/best.pth", "f" * 64, 1, "best")
    registry.record_checkpoint(run.id, "/ckpt/best2.pth", "e" * 64, 2, "best")
    registry.record_provenance(run.id, {"git_commit": "abc", "git_dirty": True, "torch": "2.x", "host": "h",
                                        "cuda_visible_devices": "0"})
    registry.record_audit(run.id, {"verdict": "old"})
    registry.record_audit(run.id, {"verdict": "new"})

    epochs = {(e.epoch, e.split): e.metrics for e in registry.epochs(run.id)}
    assert epochs == {(1, "train"): {"total": 2.5, "lr": 2e-3}, (1, "test"): METRICS}
    assert registry.results(run.id) == {
        "best-on-test": {"epoch": 1, "split": "test", "metrics": METRICS},
        "last": {"epoch": 1, "split": "test", "metrics": {**METRICS, "R1": 1.0}},
    }
    [checkpoint] = registry.checkpoints(run.id)
    assert (checkpoint.path, checkpoint.sha256, checkpoint.epoch, checkpoint.role) == ("/ckpt/best2.pth", "e" * 64, 2,
                                                                                       "best")
    provenance = registry.provenance(run.id)
    assert provenance["git_commit"] == "abc" and provenance["git_dirty"] is True
    assert provenance["cuda_visible_devices"] == "0" and provenance["python"] is None
    assert registry.latest_audit(run.id).report == {"verdict": "new"}
    with pytest.raises(ValueError):
        registry.record_result(run.id, "best-on-train", 1, "test", METRICS)


def test_get_run_by_id_or_unique_hash_prefix(registry):
    a = registry.plan_run(planned(1, config_hash="aa11" + "0" * 60))
    b = registry.plan_run(planned(2, config_hash="aa22" + "0" * 60))
    assert registry.get_run(a.id).id == a.id
    assert registry.get_run(str(b.id)).id == b.id
    assert registry.get_run("aa2").id == b.id
    for ref, message in (("aa", "several"), ("ffff", "no run"), ("999", "no run")):
        with pytest.raises(InputError, match=message):
            registry.get_run(ref)


def test_one_config_planned_by_two_specs_trains_once_and_fills_both_tables(registry):
    headline = dataclasses.replace(planned(1), spec_name="headline", table="headline", row_label="PHP")
    module = dataclasses.replace(planned(1), spec_name="module", table="module", row_label="full")
    run = registry.plan_run(headline)
    assert registry.plan_run(module).id == run.id and registry.plan_run(module).id == run.id
    registry.record_result(run.id, "best-on-test", 2, "test", METRICS)
    registry.mark_done(run.id)
    assert [(r.table, r.spec_name, r.row_label) for r in registry.result_rows()] == [
        ("headline", "headline", "PHP"), ("module", "module", "full")]
    assert [r.row_label for r in registry.result_rows("module")] == ["full"]
    assert [r.id for r in registry.list_runs(table="module")] == [run.id]
    assert [r.id for r in registry.list_runs(spec_name="headline")] == [run.id]


def test_list_runs_filters(registry):
    a = registry.plan_run(planned(1))
    b = registry.plan_run(planned(2, table=None))
    registry.mark_failed(b.id, "boom")
    assert [r.id for r in registry.list_runs(status="failed")] == [b.id]
    assert [r.id for r in registry.list_runs(status=["queued", "failed"])] == [a.id, b.id]
    assert [r.id for r in registry.list_runs(table="cnum")] == [a.id]
    assert registry.list_runs(kind="imported") == []
    assert registry.get_run(b.id).error == "boom"


def test_result_rows_carry_the_latest_audit_of_done_runs(registry):
    done = registry.plan_run(planned(1))
    registry.plan_run(planned(2))  # queued: no row
    registry.record_result(done.id, "best-on-test", 3, "test", METRICS)
    registry.record_audit(done.id, {"n": 1})
    registry.record_audit(done.id, {"n": 2})
    registry.mark_done(done.id)
    [row] = registry.result_rows("cnum")
    assert (row.table, row.spec_name, row.row_label, row.dataset, row.seed, row.rule, row.kind) == (
        "cnum", "cnum", "9", "CUHK-PEDES", 1, "best-on-test", "trained")
    assert row.metrics == METRICS and row.audit == {"n": 2} and not row.forced_test
    assert registry.result_rows("loss") == []

    trial = registry.plan_run(planned(3), kind="trial")  # selects on test: tuned on test labels
    registry.record_result(trial.id, "best-on-test", 1, "test", METRICS)
    registry.mark_done(trial.id)
    assert [(r.seed, r.kind, r.forced_test) for r in registry.result_rows("cnum")] == [
        (1, "trained", False), (3, "trial", True)]


def test_result_rows_of_a_preset_leave_out_other_presets_but_keep_imported_runs(registry):
    def done(plan, kind="trained"):
        run = registry.plan_run(plan, kind=kind)
        registry.record_result(run.id, "best-on-test", 1, "test", METRICS)
        registry.mark_done(run.id)

    done(planned(1))  # preset tiny
    done(dataclasses.replace(planned(2), preset="paper"))
    done(dataclasses.replace(planned(3), preset="released"), kind="imported")
    assert sorted(r.seed for r in registry.result_rows("cnum")) == [1, 2, 3]
    assert sorted(r.seed for r in registry.result_rows("cnum", preset="paper")) == [2, 3]
    assert sorted(r.seed for r in registry.result_rows("cnum", preset="tiny")) == [1, 3]


def test_claim_states(registry):
    run = registry.plan_run(planned())
    assert registry.claim_run(run.id, "w1")
    assert not registry.claim_run(run.id, "w2")  # fresh heartbeat: owned
    claimed = registry.get_run(run.id)
    assert (claimed.status, claimed.worker, claimed.attempts) == ("running", "w1", 1)
    assert registry.heartbeat(run.id, "w1") and not registry.heartbeat(run.id, "w2")
    registry.mark_failed(run.id, "crash")
    assert registry.claim_run(run.id, "w2")  # failed runs resume
    assert registry.get_run(run.id).attempts == 2 and registry.get_run(run.id).error is None
    registry.mark_done(run.id)
    assert not registry.claim_run(run.id, "w3")
    assert not registry.mark_failed(run.id, "late", worker="w2")  # only the owner of a running run


def test_a_stale_heartbeat_makes_a_running_run_claimable(registry):
    run = registry.plan_run(planned())
    assert registry.claim_run(run.id, "otherhost:1")
    assert not registry.claim_run(run.id, "w2")
    with registry.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET heartbeat_at = heartbeat_at - 10000 WHERE id = :id"), {"id": run.id})
    assert registry.is_claimable(registry.get_run(run.id))
    assert registry.claim_run(run.id, "w2")
    assert not registry.heartbeat(run.id, "otherhost:1")  # the old owner learns it lost the run


def test_a_run_of_a_dead_local_process_is_claimable_at_once(registry):
    run = registry.plan_run(planned())
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_worker = f"{socket.gethostname()}:{finished.stdout.strip()}"
    assert registry.claim_run(run.id, dead_worker)
    alive_worker = f"{socket.gethostname()}:{__import__('os').getpid()}"
    assert registry.claim_run(run.id, alive_worker)  # the dead process's heartbeat is fresh, yet it is gone
    assert not registry.claim_run(run.id, "w3")  # the live one keeps it


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombie detection reads procfs (Linux)")
def test_a_run_of_an_unreaped_dead_process_is_claimable(registry):
    run = registry.plan_run(planned())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":  # exited, not reaped
        assert time.time() < deadline
        time.sleep(0.05)
    assert registry.claim_run(run.id, f"{socket.gethostname()}:{zombie.pid}")
    assert registry.claim_run(run.id, "w2")
    zombie.wait()


def test_claim_next_takes_the_oldest_claimable_run_in_scope(registry):
    a, b, c = (registry.plan_run(planned(seed)) for seed in (1, 2, 3))
    imported = registry.plan_run(planned(4), kind="imported")
    registry.mark_done(a.id)
    first = registry.claim_next("w1")
    assert (first.id, first.status, first.worker, first.attempts) == (b.id, "running", "w1", 1)
    assert registry.claim_next("w2", run_ids=[a.id, b.id, imported.id]) is None  # done, owned, never trains
    assert registry.claim_next("w2", run_ids=[]) is None
    assert registry.claim_next("w2").id == c.id
    assert registry.claim_next("w3") is None
    registry.mark_failed(c.id, "crash")
    assert registry.claim_next("w3", run_ids=[c.id]).attempts == 2  # failed runs are claimable again
    assert registry.get_run(imported.id).status == "queued"


def test_claim_next_recovers_stale_and_dead_owners(registry):
    stale, orphan = registry.plan_run(planned(1)), registry.plan_run(planned(2))
    assert registry.claim_next("otherhost:1").id == stale.id
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    assert registry.claim_next(f"{socket.gethostname()}:{dead_pid}").id == orphan.id
    assert registry.claim_next("w2", run_ids=[stale.id]) is None  # fresh heartbeat, remote host: owned
    with registry.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET heartbeat_at = heartbeat_at - 10000 WHERE id = :id"), {"id": stale.id})
    assert registry.claim_next("w2", run_ids=[stale.id]).worker == "w2"
    assert registry.claim_next("w3").id == orphan.id  # its worker's process no longer exists
    assert registry.claim_next("w4") is None


def test_requeue_and_job_ids(registry):
    run = registry.plan_run(planned())
    assert registry.get_run(run.id).executor is None and registry.get_run(run.id).job_id is None
    registry.set_job(run.id, "slurm", "4242_3")
    assert not registry.requeue(run.id)  # only running runs go back to the queue
    registry.claim_run(run.id, "w1")
    registry.set_run_dir(run.id, "/runs/1")
    assert not registry.requeue(run.id, worker="w2")  # not its owner
    assert registry.requeue(run.id, worker="w1")
    back = registry.get_run(run.id)
    assert (back.status, back.worker, back.run_dir, back.executor, back.job_id) == (
        "queued", None, "/runs/1", "slurm", "4242_3")
    assert registry.claim_next("w2").id == run.id and not registry.heartbeat(run.id, "w1")
    assert registry.requeue(run.id)
    registry.set_job(run.id, None, None)
    assert (registry.get_run(run.id).executor, registry.get_run(run.id).job_id) == (None, None)


def test_postgresql_claims_skip_a_run_another_transaction_holds(registry):
    only("postgresql", registry)
    held, free = registry.plan_run(planned(1)), registry.plan_run(planned(2))
    claimed = []
    with registry.engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT id FROM runs WHERE id = :id FOR UPDATE"), {"id": held.id})
        claimer = threading.Thread(target=lambda: claimed.append(registry.claim_next("w1").id))
        claimer.start()
        claimer.join(30)
        assert claimed == [free.id]  # without SKIP LOCKED the claimer waits for the held row's lock
    claimer.join()
    assert registry.claim_next("w2").id == held.id


def _drain_in_process(url: str, worker: str, start, results) -> None:
    registry = Registry(url)
    start.wait()
    claimed = []
    while (run := registry.claim_next(worker)) is not None:
        claimed.append(run.id)
    results.put((worker, claimed))
    registry.close()


def test_concurrent_workers_draining_the_queue_claim_each_run_once(registry_url):
    registry = Registry(registry_url)
    run_ids = [registry.plan_run(planned(seed)).id for seed in range(1, 41)]
    registry.close()
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_drain_in_process, args=(registry_url, f"p{i}", start, results))
                 for i in range(4)]
    for process in processes:
        process.start()
    start.set()
    outcomes = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(60)
    claimed = sorted(run_id for ids in outcomes.values() for run_id in ids)
    assert claimed == run_ids  # none twice, none left
    registry = Registry(registry_url)
    assert {r.worker for r in registry.list_runs()} <= set(outcomes)
    assert all(r.status == "running" and r.attempts == 1 for r in registry.list_runs())
    registry.close()


def _claim_in_process(url: str, run_id: int, worker: str, start, results) -> None:
    registry = Registry(url)
    start.wait()
    results.put((worker, registry.claim_run(run_id, worker)))
    registry.close()


def test_concurrent_processes_claiming_one_run_exactly_one_wins(registry_url):
    run = Registry(registry_url).plan_run(planned())
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_claim_in_process, args=(registry_url, run.id, f"p{i}", start, results))
                 for i in range(6)]
    for process in processes:
        process.start()
    time.sleep(0.5)
    start.set()
    for process in processes:
        process.join(60)
    outcomes = dict(results.get(timeout=5) for _ in processes)
    winners = [worker for worker, won in outcomes.items() if won]
    assert len(winners) == 1
    assert Registry(registry_url).get_run(run.id).worker == winners[0]


def test_concurrent_threads_claiming_one_run_exactly_one_wins(registry):
    run = registry.plan_run(planned())
    barrier, won = threading.Barrier(8), []

    def claim(i: int) -> None:
        barrier.wait()
        if registry.claim_run(run.id, f"t{i}"):
            won.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


def only(backend: str, registry: Registry) -> None:
    if registry.engine.dialect.name != backend:
        pytest.skip(f"a {backend} behaviour")


def test_sqlite_uses_wal_and_a_busy_timeout(registry):
    only("sqlite", registry)
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


# The registry's layouts before Alembic, as the hand-written migrations of schema versions 1-3 made
# them (with their own version table): fixtures, frozen here so the revisions are checked against them.
def legacy_tables(version: int) -> MetaData:
    md = MetaData()
    Table("schema_version", md, Column("version", Integer, primary_key=True))
    Table(
        "runs", md,
        Column("id", Integer, primary_key=True),
        Column("config_hash", String(64), unique=True, nullable=False),
        Column("config", JSON, nullable=False),
        Column("dataset", String(64), nullable=False, index=True),
        Column("spec_name", String(128), nullable=False),
        Column("table_name", String(128), index=True),
        Column("row_label", String(256), nullable=False),
        Column("seed", Integer, nullable=False),
        Column("preset", String(64), nullable=False),
        Column("status", String(16), nullable=False, index=True),
        Column("error", Text),
        Column("created_at", Float, nullable=False),
        Column("started_at", Float),
        Column("finished_at", Float),
        Column("worker", String(256)),
        Column("heartbeat_at", Float),
        Column("attempts", Integer, nullable=False),
        Column("run_dir", Text),
        *([Column("kind", String(16), nullable=False, server_default="trained")] if version >= 2 else []),
    )

    def child(name, *columns, unique=(), run_id_unique=False):
        Table(name, md, Column("id", Integer, primary_key=True),
              Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False,
                     index=not run_id_unique, unique=run_id_unique),
              *columns, *([UniqueConstraint(*unique)] if unique else []))

    child("epoch_metrics", Column("epoch", Integer, nullable=False), Column("split", String(16), nullable=False),
          Column("name", String(64), nullable=False), Column("value", Float, nullable=False),
          unique=("run_id", "epoch", "split", "name"))
    child("results", Column("rule", String(16), nullable=False), Column("epoch", Integer, nullable=False),
          Column("split", String(16), nullable=False), Column("metrics", JSON, nullable=False),
          unique=("run_id", "rule"))
    child("checkpoints", Column("role", String(32), nullable=False), Column("path", Text, nullable=False),
          Column("sha256", String(64), nullable=False), Column("epoch", Integer), unique=("run_id", "role"))
    child("provenance", *(Column(n, String(64)) for n in ("git_commit", "python", "torch", "torchvision", "php_run")),
          Column("git_dirty", Boolean), Column("device", String(256)), Column("host", String(256)),
          Column("command", Text), Column("recorded_at", Float, nullable=False), Column("extra", JSON, nullable=False),
          run_id_unique=True)
    if version >= 2:
        child("audits", Column("report", JSON, nullable=False), Column("created_at", Float, nullable=False))
    if version >= 3:
        Table("run_labels", md, Column("id", Integer, primary_key=True),
              Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
              Column("spec_name", String(128), nullable=False), Column("table_name", String(128), index=True),
              Column("row_label", String(256), nullable=False), UniqueConstraint("run_id", "spec_name", "row_label"))
    return md


def legacy_rows(version: int) -> dict[str, list[dict]]:
    """Two runs with a row in every table of ``version``'s layout."""
    rows: dict[str, list[dict]] = {"schema_version": [{"version": v} for v in range(1, version + 1)]}
    rows["runs"] = [
        dict(id=i, config_hash=f"{i:064x}", config={"model": {"cnum": i}}, dataset="RSTPReid", spec_name="module",
             table_name="module" if i == 1 else None, row_label=f"row{i}", seed=i, preset="paper",
             status=("done", "running")[i - 1], error=None, created_at=float(i), started_at=2.0 * i,
             finished_at=None, worker=f"host:{i}", heartbeat_at=3.0 * i, attempts=i, run_dir=f"/runs/{i}",
             **({"kind": ("trained", "imported")[i - 1]} if version >= 2 else {}))
        for i in (1, 2)
    ]
    rows["epoch_metrics"] = [dict(id=i, run_id=1, epoch=1, split="test", name=n, value=v)
                             for i, (n, v) in enumerate(METRICS.items(), 1)]
    rows["results"] = [dict(id=1, run_id=1, rule="best-on-test", epoch=1, split="test", metrics=METRICS)]
    rows["checkpoints"] = [dict(id=1, run_id=1, role="best", path="/runs/1/best.pth", sha256="f" * 64, epoch=1)]
    rows["provenance"] = [dict(id=1, run_id=1, git_commit="abc", python="3.11", torch="2.x", torchvision="0.x",
                               php_run="0.1", git_dirty=False, device="cpu", host="h", command="php-run run",
                               recorded_at=5.0, extra={"cuda_visible_devices": "0"})]
    if version >= 2:
        rows["audits"] = [dict(id=1, run_id=1, report={"verdict": "ok"}, created_at=6.0)]
    if version >= 3:
        rows["run_labels"] = [dict(id=1, run_id=1, spec_name="module", table_name="module", row_label="row1"),
                              dict(id=2, run_id=1, spec_name="headline", table_name="headline", row_label="PHP"),
                              dict(id=3, run_id=2, spec_name="module", table_name=None, row_label="row2")]
    return rows


def all_rows(url: str, md: MetaData) -> dict[str, list[dict]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = {name: [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
                for name, table in md.tables.items() if name != "schema_version"}
    engine.dispose()
    return rows


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_database_of_an_earlier_schema_version_upgrades_in_place_keeping_every_row(registry_url, version):
    md, rows = legacy_tables(version), legacy_rows(version)
    engine = create_engine(registry_url)
    with engine.begin() as conn:
        md.create_all(conn)
        for name, table_rows in rows.items():
            conn.execute(md.tables[name].insert(), table_rows)
            if conn.dialect.name == "postgresql" and name != "schema_version":  # explicit ids: move the sequence on
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT MAX(id) FROM {name}))"))
    engine.dispose()

    registry = Registry(registry_url)
    with registry.engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert "schema_version" not in inspect(conn).get_table_names()  # the old version table is gone
    registry.close()
    after = all_rows(registry_url, Base.metadata)
    for name, before in rows.items():
        if name != "schema_version":
            assert [{k: row[k] for k in before[0]} for row in after[name]] == before, name
    assert [(r["kind"], r["executor"], r["job_id"]) for r in after["runs"]] == (
        [("trained", None, None), ("imported", None, None)] if version >= 2 else [("trained", None, None)] * 2)
    if version < 3:  # every run keeps its label
        assert [(r["run_id"], r["spec_name"], r["table_name"], r["row_label"]) for r in after["run_labels"]] == [
            (1, "module", "module", "row1"), (2, "module", None, "row2")]
    if version < 2:
        assert after["audits"] == []

    registry = Registry(registry_url)  # reopening applies nothing twice; the upgraded registry works
    assert [(r.table, r.row_label) for r in registry.result_rows("module")] == [("module", "row1")]
    run = registry.plan_run(planned(3))
    assert registry.claim_next("w", run_ids=[run.id]).id == run.id
    registry.close()


def test_optuna_studies_in_the_registry_database_survive_the_upgrade(registry_url):
    """Optuna keeps its own Alembic revision (in ``alembic_version``) in the same database."""
    import optuna

    engine = create_engine(registry_url)
    with engine.begin() as conn:
        legacy_tables(3).create_all(conn)
        conn.execute(text("INSERT INTO schema_version (version) VALUES (1), (2), (3)"))
    engine.dispose()
    optuna.create_study(study_name="s", storage=registry_url).optimize(lambda trial: trial.suggest_float("x", 0, 1),
                                                                       n_trials=1)
    Registry(registry_url).close()
    Registry(registry_url).close()
    assert len(optuna.load_study(study_name="s", storage=registry_url).trials) == 1


def test_an_alembic_database_at_an_older_revision_upgrades(registry_url):
    engine = create_engine(registry_url)
    assert upgrade(engine, target="0002") == "0002"
    with engine.connect() as conn:
        assert "run_labels" not in inspect(conn).get_table_names()
    engine.dispose()
    registry = Registry(registry_url)
    registry.plan_run(planned())
    assert [r.row_label for r in registry.list_runs(table="cnum")] == ["9"]
    registry.close()


def test_the_models_and_the_migration_head_do_not_differ(registry_url):
    """A model change without its Alembic revision fails here (autogenerate's comparison)."""
    engine = create_engine(registry_url)
    upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()
    assert [revision for revision, _ in revision_history()][-1] == head_revision()


def test_a_newer_schema_or_a_bad_url_is_bad_input(registry_url, tmp_path):
    Registry(registry_url).close()
    engine = create_engine(registry_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE php_run_schema_revision SET version_num = 'ffff9999'"))
    engine.dispose()
    with pytest.raises(InputError, match="schema revision ffff9999 is newer than this php-run"):
        Registry(registry_url)
    with pytest.raises(InputError, match="cannot open"):
        Registry(f"sqlite:///{tmp_path}/missing-folder/registry.db")
    with pytest.raises(InputError):
        Registry("nosuchdialect://x")


def test_a_legacy_version_newer_than_any_revision_is_refused(registry_url):
    engine = create_engine(registry_url)
    with engine.begin() as conn:
        legacy_tables(3).create_all(conn)
        conn.execute(text("INSERT INTO schema_version (version) VALUES (99)"))
    engine.dispose()
    with pytest.raises(InputError, match="schema revision 0099 is newer"):
        Registry(registry_url)


def test_a_database_of_other_tables_is_refused(registry_url):
    engine = create_engine(registry_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))
    engine.dispose()
    with pytest.raises(InputError, match="not a php-run registry .*users"):
        Registry(registry_url)
    engine = create_engine(registry_url)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == ["users"]
    engine.dispose()


def test_url_resolution(monkeypatch):
    monkeypatch.delenv("PHP_RUN_DB", raising=False)
    assert resolve_url(None) == "sqlite:///registry.db"
    monkeypatch.setenv("PHP_RUN_DB", "sqlite:////tmp/x.db")
    assert resolve_url(None) == "sqlite:////tmp/x.db"
    assert resolve_url("sqlite:///given.db") == "sqlite:///given.db"


def test_errors_about_a_server_registry_never_print_its_password():
    with pytest.raises(InputError) as caught:
        Registry("postgresql+psycopg://php:s3cret-pw@127.0.0.1:1/registry")
    assert "s3cret-pw" not in str(caught.value)
    assert "php:***@127.0.0.1:1/registry" in str(caught.value)
