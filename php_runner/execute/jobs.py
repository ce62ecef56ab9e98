"""The scheduler side of runs: their Slurm job states (sacct) and cancelling their jobs (scancel).

A run dispatched by ``launch.slurm.submit`` records its executor and job id in the registry: the
array's id while it waits, its element's id (``ARRAY_ELEMENT``) once a worker claimed it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

from php_runner.errors import InputError
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord

EXECUTORS = ("slurm", "local")
SACCT_TIMEOUT_S = 30

def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Slurm's state of each job id (an array element ``12_3`` or a whole array ``12``), from sacct.

    A whole array shows the distinct states of its elements (e.g. ``RUNNING/PENDING``); ids sacct
    does not know, or every id when sacct is unavailable, are left out.
    """
    ids = sorted({job for job in job_ids if job})
    if not ids:
        return {}
    try:
        done = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return {}
    if done.returncode != 0:
        return {}
    lines = [line.split("|", 1) for line in done.stdout.splitlines() if "|" in line]
    states: dict[str, str] = {}
    for job in ids:
        exact = [state for name, state in lines if name == job]
        parts = exact or [state for name, state in lines if name.startswith(job + "_")]
        if parts:
            states[job] = "/".join(dict.fromkeys(state.split()[0] for state in parts))
    return states


def job_states(runs: Sequence[RunRecord]) -> dict[int, str]:
    """``{run id: scheduler state}`` for the runs with a Slurm job id."""
    states = slurm_states([run.job_id for run in runs if run.executor == "slurm" and run.job_id])
    return {run.id: states[run.job_id] for run in runs if run.executor == "slurm" and run.job_id in states}


def cancel(refs: Sequence[str], db_url: str | None = None, every: bool = False) -> list[tuple[RunRecord, str]]:
    """Cancel the jobs of the given runs (or of all queued or running runs with a job); queue the runs again.

    A running run's job is its array element; a queued run's is the whole array it waits in, so
    cancelling one cancels the array's workers (the array's other runs stay queued too). Runs resume
    from ``last.pth`` when submitted again. Returns (run, job id) for each run with a job.
    """
    if bool(refs) == every:
        raise InputError("cancel: give run ids or hash prefixes, or --all (not both)")
    registry = Registry(db_url)
    try:
        if every:
            runs = registry.list_runs(status=("queued", "running"))
        else:
            runs = [registry.get_run(ref) for ref in refs]
        with_jobs = [run for run in runs if run.job_id and run.executor in EXECUTORS]
        slurm_jobs = sorted({run.job_id for run in with_jobs if run.executor == "slurm"})
        if slurm_jobs:
            try:
                subprocess.run(["scancel", *slurm_jobs], capture_output=True, text=True, timeout=60)
            except OSError as err:
                raise InputError(f"cancel: cannot run scancel ({err}); is this a Slurm login node?") from None
        for run in with_jobs:
            if run.executor == "local" and run.job_id.split("_")[0].isdigit():
                _terminate(int(run.job_id.split("_")[0]))
        # With --all, runs without a job belong to bare workers (php-run worker), which keep them.
        for run in with_jobs if every else runs:
            registry.requeue(run.id)
        return [(run, run.job_id) for run in with_jobs]
    finally:
        registry.close()


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
