"""Workers as a Slurm job array through submitit: submit, job states, cancel.

``submit`` queues a spec's runs in the registry and submits one job array (``map_array``) whose
elements are queue workers (``launch.worker``) restricted to the submitted runs; each element drains
runs until none is left to claim. The registry is the only channel between the submitter and the
jobs: every node must reach the same database (PostgreSQL) and see the same working folder (for
``checkpoints/``), data and weights. A preempted or timed-out element is requeued by submitit's
checkpointing hook (``WorkerJob.checkpoint``): it stops its run's process, puts the run back in the
queue and resubmits itself, and the requeued element resumes the run from ``last.pth``.
``executor="local"`` runs the same workers as local processes through submitit's local executor.
Job states and cancelling are in ``launch.jobs``.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from php_runner.errors import InputError
from php_runner.execute.jobs import EXECUTORS
from php_runner.execute.queue import check_registry_for, enqueue
from php_runner.execute.worker import Worker, WorkerSettings
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun

DEFAULT_FOLDER = Path("checkpoints/submitit/%j")
DEFAULT_TIME = "24:00:00"
# A stopped element (SIGTERM) waits this long before returning, so that a preemption's USR2, sent
# right after SIGTERM, still reaches submitit's checkpointing hook instead of a finished job.
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class JobOptions:
    """Resources of each worker job (one array element)."""

    partition: str | None = None
    gpus_per_run: int = 1
    time: str = DEFAULT_TIME
    array_parallelism: int | None = None
    slurm_options: dict[str, str] = field(default_factory=dict)
    folder: Path = DEFAULT_FOLDER


def parse_time(text: str) -> int:
    """``HH:MM:SS`` -> whole minutes (rounded up), submitit's ``timeout_min``."""
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d)", text.strip())
    if not match:
        raise InputError(f"--time: expected HH:MM:SS, got {text!r}")
    hours, minutes, seconds = (int(part) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total == 0:
        raise InputError("--time: must be longer than 00:00:00")
    return math.ceil(total / 60)


def parse_slurm_options(items: Sequence[str]) -> dict[str, str]:
    """``["qos=high", "account=lab"]`` -> ``{"qos": "high", "account": "lab"}`` (sbatch long options)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--slurm-option: expected key=value (an sbatch option without --), got {item!r}")
        options[key.strip().lstrip("-")] = value.strip()
    return options


def build_executor(kind: str, options: JobOptions, name: str) -> submitit.Executor:
    if kind not in EXECUTORS:
        raise InputError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {kind!r}")
    if options.gpus_per_run < 0:
        raise InputError(f"--gpus-per-run: must not be negative, got {options.gpus_per_run}")
    executor = submitit.AutoExecutor(folder=options.folder, cluster=kind)
    parameters: dict[str, Any] = {"timeout_min": parse_time(options.time), "name": name}
    if kind == "slurm":
        parameters |= {"slurm_additional_parameters": dict(options.slurm_options)}
        if options.partition:
            parameters["slurm_partition"] = options.partition
        if options.gpus_per_run:
            parameters["slurm_gres"] = f"gpu:{options.gpus_per_run}"
        if options.array_parallelism:
            parameters["slurm_array_parallelism"] = options.array_parallelism
    executor.update_parameters(**parameters)
    return executor


class WorkerJob(submitit.helpers.Checkpointable):
    """One array element: a queue worker over the submitted runs, requeued on preemption or timeout."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self._worker: Worker | None = None

    def __call__(self, element: int) -> dict:
        job_id = submitit.JobEnvironment().job_id
        worker = Worker(replace(self.settings, job_id=job_id))
        self._worker = worker
        # submitit ignores SIGTERM in the job; a cancelled job must not claim another run while it dies.
        worker.stop_on(signal.SIGTERM)
        summary = worker.run()
        if worker.stopping and "SLURM_JOB_ID" in os.environ:
            time.sleep(STOP_GRACE_S)
        return {"element": element, "job_id": job_id, "worker": summary.worker, "claimed": summary.claimed,
                "requeued": summary.requeued,
                "outcomes": {o.run_id: o.status for o in summary.outcomes}}

    def checkpoint(self, element: int) -> submitit.helpers.DelayedSubmission:
        """submitit's hook on preemption or timeout: put the runs back in the queue, then requeue this job."""
        if self._worker is not None:
            self._worker.release_all()
        return submitit.helpers.DelayedSubmission(WorkerJob(self.settings), element)


@dataclass
class Submission:
    runs: list[RunRecord]
    pending: list[RunRecord]
    jobs: list[submitit.Job]
    job_id: str | None  # the array's job id (Slurm) or None (nothing submitted)


def submit(
    planned: Sequence["PlannedRun"],
    *,
    executor: str,
    db_url: str | None = None,
    allow_sqlite: bool = False,
    options: JobOptions = JobOptions(),
    workers: int | None = None,
    stale_after: float | None = None,
    command: str | None = None,
) -> Submission:
    """Queue ``planned`` and submit one array of workers over the runs not done yet.

    ``workers`` caps the array size (default: one element per pending run).
    """
    url = check_registry_for(executor, db_url, allow_sqlite)
    if workers is not None and workers < 1:
        raise InputError(f"--workers: expected at least 1, got {workers}")
    runs = enqueue(planned, url)
    pending = list({run.id: run for run in runs if run.status != "done"}.values())
    if not pending:
        return Submission(runs, [], [], None)
    settings = WorkerSettings(db_url=url, run_ids=tuple(run.id for run in pending), idle_exit=0.0,
                              stale_after=stale_after, workdir=os.getcwd(), executor=executor, command=command)
    engine = build_executor(executor, options, "php-run-worker")
    count = min(len(pending), workers or len(pending))
    jobs = engine.map_array(WorkerJob(settings), list(range(count)))
    array_id = jobs[0].job_id.split("_")[0] if executor == "slurm" else None
    registry = Registry(url)
    try:
        for run in pending:
            if registry.get_run(run.id).status == "queued":  # an element may have claimed it already
                registry.set_job(run.id, executor, array_id)
    finally:
        registry.close()
    return Submission(runs, pending, jobs, array_id)


def wait(jobs: Sequence[submitit.Job]) -> tuple[dict[str, Any], list[str]]:
    """Wait for every job: (``{job id: return value}`` of the completed ones, one line per other job)."""
    results, problems = {}, []
    for job in jobs:
        try:
            results[job.job_id] = job.result()
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"job {job.job_id}: {first}")
    return results, problems
