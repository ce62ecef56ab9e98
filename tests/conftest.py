"""Shared fixtures: a fresh registry URL per test, a small synthetic data root, small test specs."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from service_guard import service_missing

from php_runner.experiment.specs import shipped_folder

# Under pytest-xdist the workers share the cores: each takes its share of threads, as do the php-run
# processes the tests start (they inherit OMP_NUM_THREADS). xdist also hands its workers the terminal's
# size as COLUMNS/LINES (80x24 without a terminal), which would narrow php-run's redirected output from
# the width a plain pytest run sees.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
if XDIST_WORKERS > 1:
    THREADS = max(1, (os.cpu_count() or 1) // XDIST_WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

TINY_TRAIN_IDS = 4
BATCHING_TRAIN_IDS = 16  # test splits of 16 images / 32 captions (RSTPReid: 8 ids)
EXPERIMENTS = shipped_folder()
TEST_SPECS = {
    # One epoch, two seeds: two short runs.
    "two_seeds": 'extends = "base"\ndatasets = ["CUHK-PEDES"]\nseeds = [1, 2]\n[grid]\n"train.epochs" = [1]\n',
    # Two epochs, so that a run can be killed after its first checkpoint.
    "two_epochs": 'extends = "base"\ndatasets = ["CUHK-PEDES"]\nseeds = [1]\n[grid]\n"train.epochs" = [2]\n',
    # One epoch of both couplings, audited after training (as the shipped coupling spec is).
    "audited": ('extends = "base"\ndatasets = ["ICFG-PEDES"]\naudit = true\n[train]\nepochs = 1\n'
                '[grid]\n"model.coupling" = ["official", "per-sample"]\n'),
    # ICFG-PEDES has no val split, so selection on val fails inside the worker (after it claimed the run).
    "bad_selection": 'extends = "base"\ndatasets = ["ICFG-PEDES"]\n[train]\nselection = "val"\n',
}


@pytest.fixture(scope="session", autouse=True)
def image_cache_root(tmp_path_factory) -> Path:
    """Image caches (training builds them by default) go to a session folder, never to ~/.cache."""
    root = tmp_path_factory.mktemp("image_cache")
    previous = os.environ.get("PHP_RUN_CACHE")
    os.environ["PHP_RUN_CACHE"] = str(root)  # os.environ, so subprocesses inherit it
    yield root
    if previous is None:
        os.environ.pop("PHP_RUN_CACHE", None)
    else:
        os.environ["PHP_RUN_CACHE"] = previous


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Invoke php-run in process, in a fresh working directory; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from php_runner.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHP_RUN_DB", raising=False)
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """A SQLite registry in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


PG_URL_ENV = "PHP_RUN_TEST_PG_URL"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The URL of a database on the PostgreSQL server named by ``$PHP_RUN_TEST_PG_URL``
    (``scripts/services.sh start`` starts one and writes the variable to .services/env)."""
    server = os.environ.get(PG_URL_ENV)
    if not server:
        service_missing(f"{PG_URL_ENV} is not set: no PostgreSQL server (start one with scripts/services.sh start)")
    return server


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty PostgreSQL schema of its own, as a URL whose connections see only it; dropped after
    the test. (A schema per test is much cheaper than a database per test, and as private.)"""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    schema = f"php_run_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(pg_server).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    admin.dispose()


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """Synthetic CUHK-PEDES, ICFG-PEDES and RSTPReid with 4 training identities each (seed 0)."""
    from php_runner.data import write_synthetic

    root = tmp_path_factory.mktemp("tiny_data")
    write_synthetic(root, "all", num_ids=TINY_TRAIN_IDS, seed=0)
    return root


@pytest.fixture(scope="session")
def batching_data_root(tmp_path_factory) -> Path:
    """Synthetic sets whose test splits are large enough that the evaluation batch size changes the metrics."""
    from php_runner.data import write_synthetic

    root = tmp_path_factory.mktemp("batching_data")
    write_synthetic(root, "all", num_ids=BATCHING_TRAIN_IDS, seed=1)
    return root


@pytest.fixture(scope="session")
def spec_dir(tmp_path_factory) -> Path:
    """The shipped base spec and presets plus the small ``TEST_SPECS`` (run them with ``--preset tiny``)."""
    folder = tmp_path_factory.mktemp("specs")
    for name in ("base.toml", "presets.toml"):
        shutil.copy(EXPERIMENTS / name, folder / name)
    for name, body in TEST_SPECS.items():
        (folder / f"{name}.toml").write_text(body)
    return folder
