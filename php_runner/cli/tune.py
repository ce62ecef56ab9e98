"""The ``tune`` command: an Optuna study over a spec's ``[tune]`` search space, stored in the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from php_runner.cli import app
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
) -> None:
    """Tune hyperparameters on a validation split; every trial is a registry run of kind "trial".

    Running the same command again continues the study; several processes on one database share it.

    Example: php-run tune tune_php --dataset ICFG-PEDES --val-from-train 0.25 --preset tiny --trials 3
    """
    import optuna

    from php_runner.runner import command_line
    from php_runner.specs import find_spec
    from php_runner.tune import TrialRunFailed, tune

    # Each trial's progress is printed by tune(); Optuna's own per-trial log lines would repeat it.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runtime = {
        "data_root": None if data_root is None else str(data_root),
        "clip_weights": None if clip_weights is None else str(clip_weights),
        "device": device,
    }
    try:
        outcome = tune(find_spec(spec_path), dataset, db_url=db, trials=trials, preset=preset, study_name=study,
                       val_from_train=val_from_train, force_test=force_test, runtime=runtime,
                       command=command_line(), echo=typer.echo)
    except TrialRunFailed as err:
        err_console.print(f"error: {err}", markup=False)
        raise typer.Exit(EXIT_RUN_FAILED) from None
    typer.echo(f"study {outcome.study_name}: {outcome.finished_before + outcome.finished_now} of "
               f"{outcome.budget} trials finished; see php-run table tune {outcome.study_name}")
