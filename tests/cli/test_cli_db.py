"""``php-run db`` and how every command treats a registry it must not trust: a foreign database, one
from a newer php-run, damaged tables and rows. Through the real CLI, with file hashes before and after."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from php_runner.store.database import head_revision

VIEWS = (["status"], ["show", "1"], ["table", "module"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sqlite_file(path: Path, *statements: str) -> Path:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_db_commands_report_upgrade_and_list_revisions(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    code, out, _ = cli("db", "current", "--db", db)
    assert code == 0 and "none (empty or absent)" in out and not (tmp_path / "registry.db").exists()
    code, out, _ = cli("db", "upgrade", "--db", db)
    assert code == 0 and f"upgraded from an empty database to revision {head_revision()}" in out
    code, out, _ = cli("db", "upgrade", "--db", db)
    assert code == 0 and f"already at revision {head_revision()}" in out
    code, out, _ = cli("db", "current", "--db", db)
    assert code == 0 and f"revision {head_revision()} (up to date)" in out
    code, out, _ = cli("db", "history")
    assert code == 0 and out.splitlines()[0].startswith("0001 ") and f"{head_revision()} " in out


@pytest.mark.parametrize("statements", [
    ["CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO users (name) VALUES ('ada')"],
    ["CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO runs (name) VALUES ('x')"],
], ids=["users", "foreign-runs"])
@pytest.mark.parametrize("command", [*VIEWS, ["db", "upgrade"], ["db", "current"]], ids=" ".join)
def test_a_foreign_database_is_refused_untouched(cli, tmp_path, statements, command):
    path = sqlite_file(tmp_path / "other.db", *statements)
    before = sha256(path)
    code, _, err = cli(*command, "--db", f"sqlite:///{path}")
    assert code == 2
    one_line_error(err, str(path), "not a php-run registry")
    assert sha256(path) == before and not Path(f"{path}-wal").exists()


def test_a_database_from_a_newer_php_run_is_refused_untouched(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    assert cli("db", "upgrade", "--db", db)[0] == 0
    sqlite_file(tmp_path / "registry.db", "PRAGMA journal_mode = DELETE", "UPDATE php_run_schema_revision SET version_num = 'ffff'")
    before = sha256(tmp_path / "registry.db")
    for command in (*VIEWS, ["db", "upgrade"]):
        code, _, err = cli(*command, "--db", db)
        assert code == 2
        one_line_error(err, "registry.db", "schema revision ffff is newer than this php-run")
    assert sha256(tmp_path / "registry.db") == before and not (tmp_path / "registry.db-wal").exists()


def test_only_an_absent_or_empty_file_becomes_a_new_registry(cli, tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    assert cli("status", "--db", f"sqlite:///{empty}")[0] == 0  # reading creates and changes nothing
    assert cli("status", "--db", f"sqlite:///{tmp_path / 'absent.db'}")[0] == 0
    assert empty.stat().st_size == 0 and not (tmp_path / "absent.db").exists()
    assert cli("db", "upgrade", "--db", f"sqlite:///{empty}")[0] == 0
    assert cli("db", "upgrade", "--db", f"sqlite:///{tmp_path / 'absent.db'}")[0] == 0
    for path in (empty, tmp_path / "absent.db"):
        tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "results", "php_run_schema_revision"} <= tables


DAMAGE = {
    "dropped-table": ("DROP TABLE run_labels", "table run_labels is missing"),
    "dropped-runs": ("DROP TABLE runs", "table runs is missing"),
    "weird-status": ("UPDATE runs SET status = 'weird'", "table runs, row 1: status 'weird'"),
    "config-not-json": ("UPDATE runs SET config = '{not json'", "table runs, row 1: config is not valid JSON"),
    "metrics-list": ("UPDATE results SET metrics = '[1,2]'", "table results, row 1: metrics is list"),
    "metric-text": ("UPDATE results SET metrics = '{\"R1\": \"abc\"}'", "table results, row 1: metric R1 is 'abc'"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_registry_gives_one_line_naming_the_table_and_row(cli, tmp_path, damage):
    path = tmp_path / "registry.db"
    db = f"sqlite:///{path}"
    assert cli("db", "upgrade", "--db", db)[0] == 0
    statement, message = DAMAGE[damage]
    sqlite_file(
        path,
        "INSERT INTO runs (config_hash, config, kind, dataset, spec_name, table_name, row_label, seed, preset,"
        " status, created_at, attempts) VALUES ('ab', '{\"train\": {}}', 'trained', 'RSTPReid', 'module', 'module',"
        " 'full', 1, 'paper', 'done', 0, 1)",
        "INSERT INTO run_labels (run_id, spec_name, table_name, row_label) VALUES (1, 'module', 'module', 'full')",
        "INSERT INTO results (run_id, rule, epoch, split, metrics) VALUES (1, 'best-on-test', 1, 'test',"
        " '{\"R1\": 1.0, \"R5\": 2.0, \"R10\": 3.0, \"mAP\": 4.0, \"mINP\": 5.0}')",
        statement,
    )
    # A damaged status hides a run from the tables (only done runs are shown), so table has nothing to refuse.
    views = VIEWS[:2] if damage == "weird-status" else VIEWS
    for command in views:
        code, _, err = cli(*command, "--db", db)
        assert code == 2, (command, err)
        one_line_error(err, str(path), message, "damaged")


@pytest.mark.pg
def test_the_commands_work_on_a_postgresql_registry(cli, pg_url):
    assert cli("db", "current", "--db", pg_url)[1].count("none (empty or absent)") == 1
    code, out, _ = cli("db", "upgrade", "--db", pg_url)
    assert code == 0 and f"upgraded from an empty database to revision {head_revision()}" in out
    code, out, _ = cli("status", "--json", "--db", pg_url)
    assert code == 0 and out.strip() == "[]"
    code, _, err = cli("show", "1", "--db", pg_url)
    assert code == 2 and "no run with this id" in err
