"""Helpers of the launch tests: planning the test specs, php-run subprocesses of this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from php_runner.experiment.specs import expand, load_spec

REPOSITORY = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 420  # outer limit on any wait for a worker or a job (a loaded 2-core CI machine)
# Interruption tests pause each epoch this long after recording it. Epoch 1's last.pth is written after
# its pause, so the interruption, sent once that file appears, must land within epoch 2 and its pause;
# a loaded CI machine took over 15 s to start php-run cancel. The interrupted run never waits it out.
EPOCH_PAUSE = {"PHP_RUN_TEST_EPOCH_PAUSE_S": "90"}


def plan(spec_dir: Path, name: str, data_root: Path):
    return expand(load_spec(spec_dir / f"{name}.toml"), "tiny", runtime={"data_root": str(data_root)})


def php_run_env(**extra: str) -> dict:
    """The environment of a php-run subprocess that imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PHP_RUN_DB", None)
    return env | extra


def php_run(*args, cwd: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "php_runner", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or php_run_env(), **popen)


def wait_for(condition, what: str, process=None, timeout: float = JOB_TIMEOUT_S) -> None:
    """Poll ``condition`` until true; fail on ``timeout`` or when ``process`` ends first."""
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process ended first: {process.stdout.read()}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)
