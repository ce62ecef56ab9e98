"""The enqueue, worker, submit and cancel commands: runs queued in the registry, drained by workers
on this machine or by a Slurm job array (submitit)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    ClipWeightsOption,
    DataRootOption,
    DbOption,
    DeviceOption,
    GpusOption,
    OverridesArgument,
    RunsPerGpuOption,
    PresetOption,
    SeedsOption,
    say,
    parse_gpus,
)

if TYPE_CHECKING:
    from php_runner.execute.pool import RunOutcome
    from php_runner.experiment.schema import PlannedRun

SpecOrTable = Annotated[str, typer.Argument(help="A spec file (TOML) or the name of a table, e.g. cnum.")]
DatasetOption = Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")]
ExecutorOption = Annotated[str, typer.Option("--executor", help="slurm (a job array) or local (processes here, "
                                             "through submitit's local executor).")]
PartitionOption = Annotated[str | None, typer.Option("--partition", help="Slurm partition (default: the cluster's).")]
GpusPerRunOption = Annotated[int, typer.Option("--gpus-per-run", help="GPUs each job requests (Slurm GRES gpu:N).",
                                               min=0)]
TimeOption = Annotated[str, typer.Option("--time", help="Time limit of each job, HH:MM:SS; a job reaching it is "
                                         "requeued and its run resumes.")]
ParallelismOption = Annotated[int | None, typer.Option("--array-parallelism", help="At most this many array "
                                                       "elements run at once.", min=1)]
SlurmOptionOption = Annotated[list[str] | None, typer.Option("--slurm-option", help="Any sbatch option as "
                                                             "key=value, e.g. qos=high (repeatable).")]
AllowSqliteOption = Annotated[bool, typer.Option("--allow-sqlite", help="Use a SQLite registry with Slurm anyway "
                                                 "(safe only when every job runs on this node).")]
FolderOption = Annotated[Path | None, typer.Option("--folder", help="submitit's job folder (logs, pickles), on the "
                                                   "shared filesystem (default: checkpoints/submitit/%j).")]


def plan_spec_or_table(spec_or_table: str, preset: str, dataset: str, seeds: str | None, data_root: Path | None,
                       clip_weights: Path | None, device: str | None,
                       overrides: list[str] | None = None) -> list["PlannedRun"]:
    """The runs of a spec file, or of the shipped spec filling a table (with the command line's overrides)."""
    from php_runner.cli.common import datasets_option, plan_spec, runtime_values, spec_of_table
    from php_runner.experiment.specs import load_spec

    path = Path(spec_or_table)
    spec = load_spec(path) if path.suffix == ".toml" or path.is_file() else spec_of_table(spec_or_table)
    return plan_spec(spec, preset, datasets_option(dataset), seeds, runtime_values(data_root, clip_weights, device),
                     overrides)


def job_options(partition, gpus_per_run, time_limit, array_parallelism, slurm_option, folder):
    from php_runner.execute.slurm import DEFAULT_FOLDER, JobOptions, parse_slurm_options, parse_time

    parse_time(time_limit)  # bad input fails before anything is queued
    return JobOptions(partition=partition, gpus_per_run=gpus_per_run, time=time_limit,
                      array_parallelism=array_parallelism, slurm_options=parse_slurm_options(slurm_option or []),
                      folder=folder or DEFAULT_FOLDER)


def _print_outcome(outcome: "RunOutcome") -> None:
    style = {"done": "green", "skipped": "dim", "busy": "yellow", "failed": "red"}[outcome.status]
    say(f"[{style}]{outcome.status:>7}[/{style}] run {outcome.run_id} {outcome.config_hash[:12]} "
                  f"{outcome.dataset} {outcome.row_label} seed {outcome.seed}  {outcome.error or ''}")


@app.command()
def enqueue(
    spec_or_table: SpecOrTable,
    overrides: OverridesArgument = None,
    dataset: DatasetOption = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
) -> None:
    """Record a spec's runs as queued without executing them; php-run worker or submit executes them.

    Example: php-run enqueue cnum --preset tiny --dataset CUHK-PEDES --db postgresql+psycopg://php@db/php_run
    """
    from php_runner.execute.queue import enqueue as enqueue_runs

    runs = enqueue_runs(plan_spec_or_table(spec_or_table, preset, dataset, seeds, data_root, clip_weights, device, overrides), db)
    queued = sum(run.status != "done" for run in runs)
    say(f"{len(runs)} run(s): {queued} queued or resumable, {len(runs) - queued} done before")


@app.command()
def worker(
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
    max_runs: Annotated[int | None, typer.Option("--max-runs", help="Stop after claiming this many runs.", min=1)]
    = None,
    idle_exit: Annotated[float | None, typer.Option("--idle-exit", help="Stop after this many seconds with nothing "
                                                    "to claim (default: wait for new runs).", min=0)] = None,
    stale_after: Annotated[float | None, typer.Option("--stale-after", help="Claim a running run whose heartbeat "
                                                      "is older than this many seconds (default 120).", min=1)]
    = None,
    db: DbOption = None,
) -> None:
    """Claim queued runs and train them, one process per run and up to one run per listed GPU.

    Example: php-run worker --gpus 0,1,2,3 --idle-exit 600 --db postgresql+psycopg://php@db/php_run
    """
    import signal

    from php_runner.execute.worker import Worker, WorkerSettings
    from php_runner.execute.provenance import command_line

    gpu_ids = parse_gpus(gpus)
    settings = WorkerSettings(db_url=db, gpus=tuple(gpu_ids) if gpu_ids else None, runs_per_gpu=runs_per_gpu,
                              max_runs=max_runs,
                              idle_exit=idle_exit, stale_after=stale_after, command=command_line())
    runner = Worker(settings, on_outcome=_print_outcome)
    runner.stop_on(signal.SIGTERM)
    started = time.monotonic()
    summary = runner.run()
    seconds = time.monotonic() - started
    say(f"[bold]worker {summary.worker}:[/bold] {len(summary.claimed)} claimed in {seconds:.1f} s, "
                  f"{summary.count('done')} done, {summary.count('failed')} failed, "
                  f"{len(summary.requeued)} queued again")
    if runner.stopping and summary.requeued:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_RUN_FAILED if summary.count("failed") else 0)


@app.command()
def submit(
    spec_or_table: SpecOrTable,
    overrides: OverridesArgument = None,
    executor: ExecutorOption = "slurm",
    dataset: DatasetOption = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    partition: PartitionOption = None,
    gpus_per_run: GpusPerRunOption = 1,
    time_limit: TimeOption = "24:00:00",
    array_parallelism: ParallelismOption = None,
    slurm_option: SlurmOptionOption = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Array elements (default: one per run to "
                                                "execute); each drains runs until none is left.", min=1)] = None,
    folder: FolderOption = None,
    allow_sqlite: AllowSqliteOption = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the jobs, then print the runs' states.")] = False,
    db: DbOption = None,
    device: DeviceOption = None,
) -> None:
    """Queue a spec's runs and submit one job array of workers that execute them (Slurm via submitit).

    Checkpoints, data and weights must be on a filesystem every node shares, and the registry a
    database every node reaches (PostgreSQL). Submitting again resubmits what is not done.

    Example: php-run submit cnum --preset paper --data-root /shared/data --clip-weights /shared/ViT-B-16.pt
    --partition gpu --gpus-per-run 1 --time 08:00:00 --db postgresql+psycopg://php@db/php_run
    """
    from php_runner.execute import slurm
    from php_runner.execute.provenance import command_line

    options = job_options(partition, gpus_per_run, time_limit, array_parallelism, slurm_option, folder)
    planned = plan_spec_or_table(spec_or_table, preset, dataset, seeds, data_root, clip_weights, device, overrides)
    submission = slurm.submit(planned, executor=executor, db_url=db, allow_sqlite=allow_sqlite, options=options,
                              workers=workers, command=command_line())
    done_before = len({r.id for r in submission.runs}) - len(submission.pending)
    if not submission.jobs:
        say(f"{done_before} run(s), all done before; nothing submitted")
        return
    first = submission.jobs[0].job_id
    say(f"{len(submission.pending)} run(s) queued ({done_before} done before); submitted "
                  f"{len(submission.jobs)} {executor} worker job(s) {submission.job_id or first}")
    if not wait:
        return
    _, problems = slurm.wait(submission.jobs)
    for line in problems:
        say(f"[yellow]{line}[/yellow]")
    from php_runner.store.registry import Registry

    registry = Registry(db)
    states = [registry.get_run(run.id) for run in submission.pending]
    registry.close()
    not_done = [run for run in states if run.status != "done"]
    say(f"[bold]runs:[/bold] {len(states) - len(not_done)} done, {len(not_done)} not done"
                  + "".join(f"\n  run {r.id} {r.status} {r.error or ''}" for r in not_done))
    raise typer.Exit(EXIT_RUN_FAILED if not_done else 0)


@app.command()
def cancel(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids or config-hash prefixes.")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Every queued or running run with a job.")] = False,
    db: DbOption = None,
) -> None:
    """Cancel the Slurm jobs of runs (scancel) and queue the runs again; they resume when resubmitted.

    A queued run waits in its whole array, so cancelling it cancels that array's workers.

    Example: php-run cancel 12     (or: php-run cancel --all)
    """
    from php_runner.execute.jobs import cancel as cancel_runs

    cancelled = cancel_runs(runs or [], db, every=all_runs)
    for run, job_id in cancelled:
        say(f"cancelled job {job_id} of run {run.id} {run.short_hash}; the run is queued again")
    if not cancelled:
        say("no job to cancel; the runs are queued")
