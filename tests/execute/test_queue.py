"""The queue: enqueue records runs without executing them; Slurm refuses a SQLite registry."""

from __future__ import annotations

import pytest

from php_runner.errors import InputError
from php_runner.execute.queue import check_registry_for
from php_runner.store.registry import Registry


def test_enqueue_records_queued_runs_and_executes_nothing(cli, registry_url, spec_dir, tiny_data_root, tmp_path):
    args = ("enqueue", spec_dir / "two_seeds.toml", "--preset", "tiny", "--data-root", tiny_data_root,
            "--db", registry_url)
    code, out, err = cli(*args)
    assert code == 0, err
    runs = Registry(registry_url).list_runs()
    assert [(r.status, r.attempts, r.seed) for r in runs] == [("queued", 0, 1), ("queued", 0, 2)]
    assert not (tmp_path / "checkpoints").exists()
    code, out, err = cli(*args)  # the same runs again: nothing new
    assert code == 0 and "2 run(s): 2 queued" in err and not out  # a message: stderr when stdout is a pipe
    assert [r.id for r in Registry(registry_url).list_runs()] == [r.id for r in runs]


def test_enqueue_checks_the_data_before_queueing(cli, registry_url, spec_dir, tmp_path):
    code, _, err = cli("enqueue", spec_dir / "two_seeds.toml", "--preset", "paper", "--data-root",
                       tmp_path / "nowhere", "--clip-weights", tmp_path / "ViT-B-16.pt", "--db", registry_url)
    assert code == 2 and err.count("\n") == 1 and "--data-root" in err


def test_slurm_with_a_sqlite_registry_exits_2_naming_postgresql(cli, registry_url, spec_dir, tiny_data_root,
                                                                 tmp_path):
    code, out, err = cli("submit", spec_dir / "two_seeds.toml", "--executor", "slurm", "--preset", "tiny",
                         "--data-root", tiny_data_root, "--db", registry_url)
    assert code == 2
    assert err.startswith("error: registry sqlite:") and err.count("\n") == 1 and "PostgreSQL" in err
    assert not (tmp_path / "registry.db").exists()  # refused before anything was queued


def test_sqlite_is_refused_for_slurm_only_unless_allowed(registry_url):
    with pytest.raises(InputError, match="PostgreSQL"):
        check_registry_for("slurm", registry_url, allow_sqlite=False)
    assert check_registry_for("slurm", registry_url, allow_sqlite=True) == registry_url
    assert check_registry_for("local", registry_url, allow_sqlite=False) == registry_url
    server = "postgresql+psycopg://php@db/php_run"
    assert check_registry_for("slurm", server, allow_sqlite=False) == server
