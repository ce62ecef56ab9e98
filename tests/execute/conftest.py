"""Fixtures of the launch tests: services (PostgreSQL, Slurm), CLI subprocesses, local reference runs.

Service tests skip with the reason when ``PHP_RUN_TEST_PG_URL`` or ``SLURM_CONF`` is unset (start both
with ``scripts/services.sh start; source .services/env``). Every wait on a worker or a job has an
outer timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from launch_helpers import plan
from service_guard import service_missing

from php_runner.store.registry import Registry
from php_runner.execute.local import execute_planned


@pytest.fixture
def slurm(pg_url):
    """A reachable Slurm cluster (with accounting) and a fresh PostgreSQL registry URL."""
    if not os.environ.get("SLURM_CONF"):
        service_missing("SLURM_CONF is not set: no Slurm cluster (start one with scripts/services.sh start)")
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode != 0:
        service_missing("sinfo fails: the Slurm cluster named by SLURM_CONF is not reachable")
    return pg_url


@pytest.fixture(scope="session")
def local_reference(spec_dir, tiny_data_root, tmp_path_factory):
    """The test specs executed the ordinary way (php-run run's path, SQLite): ``{config_hash: results}``."""
    workdir = tmp_path_factory.mktemp("local_reference")
    url = f"sqlite:///{workdir / 'registry.db'}"
    planned = plan(spec_dir, "two_seeds", tiny_data_root) + plan(spec_dir, "two_epochs", tiny_data_root)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        summary = execute_planned(planned, url)
    finally:
        os.chdir(cwd)
    assert [o.status for o in summary.outcomes] == ["done"] * 3
    registry = Registry(url)
    try:
        return {p.config_hash: registry.results(registry.get_run(p.config_hash).id) for p in planned}
    finally:
        registry.close()
