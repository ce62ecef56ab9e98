"""One Optuna study from several workers: each worker (a submitit job) runs ``tune.tune`` on the same
study in the registry's database, so their trials share the sampler's history and the trial budget.

Optuna's storage is the registry database: PostgreSQL for workers on several nodes (SQLite only with
``allow_sqlite``, one node). Every worker stops once the study has its budget of finished trials; trials
that other workers are still running when the budget is reached finish too, so a study may end with
up to ``workers - 1`` trials beyond the budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import submitit

from php_runner.errors import InputError
from php_runner.execute.queue import check_registry_for
from php_runner.execute.slurm import JobOptions, build_executor


class TuneJob(submitit.helpers.Checkpointable):
    """One tuning worker; on preemption submitit resubmits it and it continues the study (the
    interrupted trial's values are queued again by ``tune`` and its run resumes from last.pth)."""

    def __init__(self, spec_path: str, dataset: str, tune_options: dict[str, Any]):
        self.spec_path, self.dataset, self.tune_options = spec_path, dataset, tune_options

    def __call__(self, element: int) -> dict:
        from php_runner.studies.tuning import tune

        outcome = tune(self.spec_path, self.dataset, **self.tune_options)
        return {"element": element, **dataclasses.asdict(outcome)}


def submit_tune(spec_path: str | Path, dataset: str, *, executor: str, workers: int, db_url: str | None,
                allow_sqlite: bool = False, options: JobOptions = JobOptions(),
                **tune_options: Any) -> list[submitit.Job]:
    """Submit ``workers`` tuning workers on one study as one job array; returns the jobs."""
    url = check_registry_for(executor, db_url, allow_sqlite)
    if workers < 1:
        raise InputError(f"--workers: expected at least 1, got {workers}")
    from php_runner.studies.tuning import tune

    options_here = {**tune_options, "db_url": url, "echo": print}
    # The study is created and marked here, once: workers creating it at the same time would collide.
    tune(spec_path, dataset, **options_here, prepare_only=True)
    job = TuneJob(str(Path(spec_path).resolve()), dataset, options_here)
    return build_executor(executor, options, "php-run-tune").map_array(job, list(range(workers)))
