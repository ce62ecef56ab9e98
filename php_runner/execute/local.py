"""Executing planned runs on this machine: plan them in the registry, then drain them with a worker.

``php-run run``/``reproduce``/``ablate`` execute here. There is no second scheduler: the runs this
invocation planned are drained by the same ``worker.Worker`` that serves the queue and Slurm jobs,
restricted to those runs and ending when none of them is left to claim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from php_runner.execute.checkpoints import restart_runs
from php_runner.execute.pool import ExecutionSummary, RunOutcome, outcome_of
from php_runner.execute.preflight import preflight_all
from php_runner.execute.queue import plan_all
from php_runner.execute.worker import Worker, WorkerSettings
from php_runner.store.registry import Registry
from php_runner.store.database import resolve_url

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun


def execute_planned(
    planned: Sequence["PlannedRun"],
    db_url: str | None = None,
    gpus: Sequence[str] | None = None,
    command: str | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
    restart: Sequence[str] = (),
    runs_per_gpu: int = 1,
) -> ExecutionSummary:
    """Plan every run, then execute the runs that are not done, each in its own process.

    With ``gpus`` (e.g. ``["0", "1"]``) up to ``runs_per_gpu`` processes run on each GPU at a time,
    each seeing only its GPU through ``CUDA_VISIBLE_DEVICES``; without, ``runs_per_gpu`` run at a time
    on the default device (one after another by default). A failed run is recorded and the others go on;
    a run another live process holds is reported busy. Bad input found before any training raises
    ``InputError``. ``restart`` names runs (ids or hash prefixes) to start again from scratch.
    """
    db_url = resolve_url(db_url)
    registry = Registry(db_url)
    try:
        preflight_all(registry, planned)  # every check before anything is recorded
        restart_runs(registry, planned, restart)
        runs = plan_all(registry, planned)
    finally:
        registry.close()
    summary = ExecutionSummary()

    def report(outcome: RunOutcome) -> None:
        summary.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    pending = [run for run in runs if run.status != "done"]
    for run in runs:
        if run.status == "done":
            report(outcome_of(run, "skipped"))
    if pending:
        settings = WorkerSettings(db_url=db_url, gpus=tuple(gpus) if gpus else None, runs_per_gpu=runs_per_gpu,
                                  idle_exit=0, run_ids=tuple(dict.fromkeys(run.id for run in pending)),
                                  executor=None, command=command, local=True)
        worker = Worker(settings, on_outcome=report)
        worker.run()
        _report_unclaimed(db_url, pending, [o.run_id for o in worker.summary.outcomes], report)
    return summary


def _report_unclaimed(db_url: str, pending, reported: list[int], report: Callable[[RunOutcome], None]) -> None:
    """Outcomes of the planned runs the worker did not execute: done meanwhile (or planned twice, and
    executed once), or held by another live process."""
    unreported = list(reported)
    registry = Registry(db_url)
    try:
        for run in pending:
            if run.id in unreported:
                unreported.remove(run.id)
                continue
            run = registry.get_run(run.id)
            report(outcome_of(run, "skipped" if run.status == "done" else "busy"))
    finally:
        registry.close()
