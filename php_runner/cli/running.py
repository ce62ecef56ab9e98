"""`php-run demo|reproduce|ablate|run`: plan a spec's runs, execute them in one scheduling loop, print the tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_RUN_FAILED,
    SYNTHETIC_ROOT,
    ClipWeightsOption,
    DataRootOption,
    DbOption,
    DeviceOption,
    GpusOption,
    PresetOption,
    RunsPerGpuOption,
    SeedsOption,
    check_run_refs,
    say,
    datasets_option,
    OverridesArgument,
    parse_gpus,
    plan_spec,
    runtime_values,
    spec_of_table,
)
from php_runner.cli.tables import print_tables
from php_runner.errors import InputError
from php_runner.store.registry import Registry

if TYPE_CHECKING:
    from php_runner.experiment.schema import PlannedRun, Spec

ABLATIONS = ("cnum", "loss", "module", "beta", "sharing", "coupling")
HEADLINE_TABLE = "headline"


def run_spec_runs(spec: "Spec", preset: str, datasets: list[str] | None, seeds: str | None, data_root: Path | None,
                  clip_weights: Path | None, device: str | None, db: str | None, gpus: str | None,
                  restart: list[str] | None = None, runs_per_gpu: int = 1, overrides: list[str] | None = None) -> int:
    """Plan a spec's runs (with the command line's overrides) and execute them (auditing them when the
    spec asks); returns the exit code."""
    planned = plan_spec(spec, preset, datasets, seeds, runtime_values(data_root, clip_weights, device), overrides)
    return execute_and_report(planned, db, gpus, audit=spec.audit, device=device, restart=restart, runs_per_gpu=runs_per_gpu)


def execute_and_report(planned: list["PlannedRun"], db: str | None, gpus: str | None, audit: bool = False,
                       device: str | None = None, restart: list[str] | None = None, runs_per_gpu: int = 1) -> int:
    """Execute ``planned`` and print a summary; returns the exit code (1 when a run failed, 2 when every
    failure was a run's dataset refused).

    With ``audit`` (a spec field), every done run without an audit report is audited afterwards.
    """
    from php_runner.execute.local import execute_planned
    from php_runner.execute.pool import RunOutcome
    from php_runner.execute.provenance import command_line

    gpu_ids = parse_gpus(gpus)

    def on_outcome(outcome: RunOutcome) -> None:
        style = {"done": "green", "skipped": "dim", "busy": "yellow", "failed": "red"}[outcome.status]
        note = {
            "skipped": "done before, not trained again",
            "busy": "another php-run process is running it",
        }.get(outcome.status, outcome.error or "")
        say(f"[{style}]{outcome.status:>7}[/{style}] run {outcome.run_id} {outcome.config_hash[:12]} "
                      f"{outcome.dataset} {outcome.row_label} seed {outcome.seed}  {note}")

    summary = execute_planned(planned, db, gpu_ids, command=command_line(), on_outcome=on_outcome,
                              restart=restart or (), runs_per_gpu=runs_per_gpu)
    counts = ", ".join(f"{summary.count(s)} {s}" for s in ("done", "skipped", "busy", "failed") if summary.count(s))
    say(f"[bold]{len(planned)} planned run(s):[/bold] {counts}")  # after preflight: bad input stays one line
    if audit:
        _audit_done_runs(planned, db, device)
    if summary.bad_input_only:  # e.g. an unreadable image, found when the run read its dataset
        return EXIT_BAD_INPUT
    return EXIT_RUN_FAILED if summary.failed else 0


def _audit_done_runs(planned: list["PlannedRun"], db: str | None, device: str | None) -> None:
    """Audit each done run of ``planned`` that has no audit report yet, and store the report."""
    from php_runner.studies.audit import audit_run, audit_summary

    registry = Registry(db)
    try:
        for plan in planned:
            run = registry.get_run(plan.config_hash)
            if run.status != "done" or registry.latest_audit(run.id) is not None:
                continue
            say(f"auditing run {run.id} {run.config_hash[:12]} {run.dataset} {run.row_label}")
            summary = audit_summary(audit_run(registry, run.id, device=device or "auto"))
            say("   " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                                            for key, value in summary.items()))
    finally:
        registry.close()


@app.command()
def demo(
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Write synthetic data, reproduce the headline table with the tiny preset, and print it.

    Runs already in the registry are not trained again, so a second demo prints the table at once.

    Example: php-run demo
    """
    from php_runner.data import DATASET_NAMES, write_synthetic

    root = data_root or SYNTHETIC_ROOT
    for name in DATASET_NAMES:
        if not (root / name).exists():
            say(f"writing synthetic {name} under {root}")
            write_synthetic(root, name)
    code = run_spec_runs(spec_of_table(HEADLINE_TABLE), "tiny", None, seeds, root, None, device, db, gpus)
    print_tables([HEADLINE_TABLE], db, include_empty=True, as_json=False, preset="tiny")
    raise typer.Exit(code)


@app.command()
def reproduce(
    overrides: OverridesArgument = None,
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
) -> None:
    """Train the paper's headline configuration on one or all datasets, then print the headline table.

    Example: php-run reproduce --dataset CUHK-PEDES --data-root data --clip-weights ViT-B-16.pt
    """
    code = run_spec_runs(spec_of_table(HEADLINE_TABLE), preset, datasets_option(dataset), seeds, data_root,
                         clip_weights, device, db, gpus, runs_per_gpu=runs_per_gpu, overrides=overrides)
    print_tables([HEADLINE_TABLE], db, include_empty=True, as_json=False, preset=preset)
    raise typer.Exit(code)


@app.command()
def ablate(
    name: Annotated[str, typer.Argument(help=f"The ablation: {', '.join(ABLATIONS)}.")],
    overrides: OverridesArgument = None,
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
) -> None:
    """Run one of the paper's ablations (or our coupling ablation), then print its table.

    Example: php-run ablate cnum --dataset CUHK-PEDES --preset tiny
    """
    if name not in ABLATIONS:
        raise InputError(f"ablation {name!r}: expected one of {', '.join(ABLATIONS)}")
    code = run_spec_runs(spec_of_table(name), preset, datasets_option(dataset), seeds, data_root, clip_weights,
                         device, db, gpus, runs_per_gpu=runs_per_gpu, overrides=overrides)
    print_tables([name], db, include_empty=True, as_json=False, preset=preset)
    raise typer.Exit(code)


@app.command("run")
def run_spec(
    spec_path: Annotated[Path, typer.Argument(help="A spec file (TOML), or a shipped spec's name (php-run ls), e.g. cnum.")],
    overrides: OverridesArgument = None,
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    preset: PresetOption = "paper",
    data_root: DataRootOption = None,
    clip_weights: ClipWeightsOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
    device: DeviceOption = None,
    gpus: GpusOption = None,
    runs_per_gpu: RunsPerGpuOption = 1,
    restart: Annotated[list[str] | None, typer.Option(
        "--restart", help="Train this run (id or hash prefix, one of the spec's) again from scratch, deleting its "
        "checkpoints: the way on when its last.pth is damaged. Repeatable.", callback=check_run_refs)] = None,
) -> None:
    """Execute every run a spec file expands to (done runs are skipped, interrupted ones resume).

    Example: php-run run cnum --preset tiny --seeds 1,2   (or a file: php-run run my_specs/cnum6.toml; --restart 7 retrains run 7)
    """
    from php_runner.experiment.specs import find_spec, load_spec

    raise typer.Exit(run_spec_runs(load_spec(find_spec(spec_path)), preset, datasets_option(dataset), seeds, data_root,
                               clip_weights, device, db, gpus, restart, runs_per_gpu, overrides))
