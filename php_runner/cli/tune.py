"""The ``tune`` command: an Optuna study over a spec's ``[tune]`` search space, stored in the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from php_runner.cli import app
from php_runner.cli.launch import (
    AllowSqliteOption,
    GpusPerRunOption,
    PartitionOption,
    SlurmOptionOption,
    TimeOption,
    job_options,
)
from php_runner.cli.common import (
    EXIT_RUN_FAILED,
    ClipWeightsOption,
    DataRootOption,
    DbOption,
    DeviceOption,
    PresetOption,
    err_console,
)


@app.command("tune")
def tune_command(
    spec_path: Annotated[Path, typer.Argument(help="A spec file with a tune section, or a shipped spec's name, e.g. tune_php.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid.")],
    trials: Annotated[int | None, typer.Option("--trials", help="Finished trials the study should reach "
                                               "(default: the spec's tune.trials).")] = None,
    preset: PresetOption = "paper",
    study: Annotated[str | None, typer.Option("--study", help="Study name (default: SPEC-DATASET-PRESET, with "
                                              "the val fraction and a forced-test mark when given).")] = None,
    val_from_train: Annotated[float | None, typer.Option(
        "--val-from-train", help="Hold out this fraction of the training identities as the val split "
        "(for datasets without one, e.g. ICFG-PEDES 0.1); seeded by data.val_seed.")] = None,
    force_test: Annotated[bool, typer.Option("--force-test", help="Allow a test.* objective; the study is marked "
                                             "as tuned on test in every table.")] = False,
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    executor: Annotated[str | None, typer.Option("--executor", help="Run the study from --workers submitit jobs: "
                                                 "slurm (a job array) or local.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="With --executor: workers sharing the study.", min=1)] = 1,
    partition: PartitionOption = None,
    gpus_per_run: GpusPerRunOption = 1,
    time_limit: TimeOption = "24:00:00",
    slurm_option: SlurmOptionOption = None,
    allow_sqlite: AllowSqliteOption = False,
) -> None:
    """Tune hyperparameters on a validation split; every trial is a registry run of kind "trial".

    Running the same command again continues the study; several processes on one database share it,
    and --executor slurm --workers N runs N Slurm jobs on it (the database must be PostgreSQL).

    Example: php-run tune tune_php --dataset ICFG-PEDES --val-from-train 0.25 --preset tiny --trials 3
    """
    import optuna

    from php_runner.execute.provenance import command_line
    from php_runner.experiment.specs import find_spec
    from php_runner.studies.study import TrialRunFailed
    from php_runner.studies.tuning import tune

    # Each trial's progress is printed by tune(); Optuna's own per-trial log lines would repeat it.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runtime = {
        "data_root": None if data_root is None else str(data_root),
        "clip_weights": None if clip_weights is None else str(clip_weights),
        "device": device,
    }
    if executor is not None:
        _submit_tune(spec_path, dataset, executor, workers, db, allow_sqlite,
                     job_options(partition, gpus_per_run, time_limit, None, slurm_option, None),
                     dict(trials=trials, preset=preset, study_name=study, val_from_train=val_from_train,
                          force_test=force_test, runtime=runtime, command=command_line()))
        return
    try:
        outcome = tune(find_spec(spec_path), dataset, db_url=db, trials=trials, preset=preset, study_name=study,
                       val_from_train=val_from_train, force_test=force_test, runtime=runtime,
                       command=command_line(), echo=typer.echo)
    except TrialRunFailed as err:
        err_console.print(f"error: {err}", markup=False)
        raise typer.Exit(EXIT_RUN_FAILED) from None
    typer.echo(f"study {outcome.study_name}: {outcome.finished_before + outcome.finished_now} of "
               f"{outcome.budget} trials finished; see php-run table tune {outcome.study_name}")


def _submit_tune(spec_path: Path, dataset: str, executor: str, workers: int, db: str | None, allow_sqlite: bool,
                 options, tune_options: dict) -> None:
    """Submit the tuning workers, wait for them, and print each one's summary."""
    from php_runner.execute.slurm import wait
    from php_runner.studies.tuning_jobs import submit_tune

    jobs = submit_tune(spec_path, dataset, executor=executor, workers=workers, db_url=db,
                       allow_sqlite=allow_sqlite, options=options, **tune_options)
    typer.echo(f"submitted {len(jobs)} {executor} tuning worker(s): {', '.join(job.job_id for job in jobs)}")
    results, problems = wait(jobs)
    for job_id, outcome in results.items():
        typer.echo(f"worker {job_id}: {outcome['finished_now']} trial(s) finished in study {outcome['study_name']}")
    for line in problems:
        err_console.print(f"error: {line}", markup=False)
    if problems:
        raise typer.Exit(EXIT_RUN_FAILED)
