"""Hyperparameter tuning with Optuna, stored in the registry's own database: ``php-run tune``.

A study lives in Optuna's tables beside the registry's (the same database URL). Each trial applies
its sampled values (the dotted config paths of the spec's ``[tune.space]``) to the spec's resolved
config and executes that config as an ordinary registry run of kind ``trial``. Runs are content
addressed: the trial keeps its run's id and hash in its user attributes, the run's row label names
the study and trial that created it, and a trial that draws the values of an existing run reuses it.

Tuning is on a validation split: training selects its checkpoint on the objective's split and the
pruner (median by default) sees that split's per-epoch metric. Datasets without a val split
(ICFG-PEDES) hold out training identities (``data.val_from_train``). An objective on the test split
is refused unless forced, and a forced study carries the ``forced_test`` user attribute.

Re-running the same command continues the study up to its trial budget; trials interrupted by
Ctrl-C or a dead process are queued again with the same values, so their run resumes from its last
checkpoint. Several processes may share a study through one database.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from php_runner.errors import InputError
from php_runner.execute.preflight import preflight
from php_runner.experiment.build import load_training_data
from php_runner.experiment.expand import config_hash, override
from php_runner.experiment.schema import PlannedRun, Spec
from php_runner.experiment.specs import expand, load_spec
from php_runner.store.registry import Registry
from php_runner.studies.study import (
    FINISHED,
    Objective,
    load_study,
    open_storage,
    storage_note,
)
from php_runner.studies.study_table import render_study, study_data
from php_runner.studies.trials import requeue_interrupted, run_trial

# Optuna's MedianPruner defaults: no pruning before 5 finished trials, from the first epoch on.
MEDIAN_STARTUP_TRIALS = 5


@dataclass(frozen=True)
class StudyOutcome:
    """What one ``tune`` invocation did, for the command's summary."""

    study_name: str
    budget: int
    finished_before: int
    finished_now: int
    storage_note: str | None


def build_pruner(name: str, startup_trials: int = MEDIAN_STARTUP_TRIALS) -> optuna.pruners.BasePruner:
    """The pruner of ``[tune] pruner``: ``median`` (Optuna's MedianPruner) or ``none``."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise InputError(f"tune.pruner: expected median or none, got {name!r}")



def check_objective(objective: Objective, force_test: bool, source: str) -> None:
    """Refuse tuning on the test split unless forced."""
    if objective.split == "test" and not force_test:
        raise InputError(
            f"{source}: tune.objective: {objective} tunes on the test split; use a val objective "
            "(with --val-from-train for datasets without a val split) or pass --force-test"
        )



def default_study_name(spec_name: str, dataset: str, preset: str, val_from_train: float, force_test: bool) -> str:
    name = f"{spec_name}-{dataset}-{preset}"
    if val_from_train:
        name += f"-val{val_from_train:g}"
    return name + ("-forced-test" if force_test else "")



def tune(
    spec_path: str | Path,
    dataset: str,
    *,
    db_url: str | None = None,
    trials: int | None = None,
    preset: str = "tiny",
    study_name: str | None = None,
    val_from_train: float | None = None,
    force_test: bool = False,
    runtime: Mapping[str, Any] | None = None,
    command: str | None = None,
    echo: Callable[[str], None] = print,
    prepare_only: bool = False,
) -> StudyOutcome:
    """Create or continue a study of the spec's ``[tune]`` section until it has ``trials`` finished trials.

    ``trials`` defaults to ``[tune] trials``; finished means completed or pruned. ``force_test``
    allows a ``test.*`` objective and marks the study as tuned on test. ``prepare_only`` creates,
    checks and marks the study and requeues interrupted trials, then returns without running any:
    done once before several workers start on the study, so that they do not race to mark it.
    """
    spec = load_spec(spec_path)
    if spec.tune is None:
        raise InputError(f"{spec.path}: no [tune] section; add one (see the shipped tune_php spec: php-run cat tune_php)")
    objective = Objective.parse(spec.tune.objective)
    check_objective(objective, force_test, str(spec.path))
    on_test = objective.split == "test"
    budget = spec.tune.trials if trials is None else trials
    if budget < 1:
        raise InputError(f"--trials: expected a positive number of trials, got {budget}")
    base = base_run(spec, dataset, preset, objective, val_from_train, runtime)

    registry = Registry(db_url)
    note = storage_note(registry.url)
    if note:
        echo(note)
    name = study_name or default_study_name(
        spec.name, dataset, preset, base.config["data"]["val_from_train"], on_test
    )
    study = open_study(name, spec, base, objective, registry, echo)
    finished_before = _count_finished(study)
    if prepare_only:
        return StudyOutcome(name, budget, finished_before, 0, note)
    remaining = budget - finished_before
    if remaining <= 0:
        echo(f"study {name}: {finished_before} finished trials, the budget of {budget} is met; nothing to run")
        return StudyOutcome(name, budget, finished_before, 0, note)
    echo(f"study {name}: {finished_before} finished trials, running up to {remaining} more ({objective}, "
         f"{spec.tune.direction})")
    study.optimize(
        lambda trial: run_trial(trial, base, spec.tune, objective, registry, name, command, echo),
        n_trials=remaining,
        callbacks=[optuna.study.MaxTrialsCallback(budget, states=FINISHED)],
    )
    return StudyOutcome(name, budget, finished_before, _count_finished(study) - finished_before, note)


def base_run(spec: Spec, dataset: str, preset: str, objective: Objective, val_from_train: float | None,
             runtime: Mapping[str, Any] | None) -> PlannedRun:
    """The spec's one planned run on ``dataset``, selecting on the objective's split: what every trial varies."""
    planned = expand(spec, preset, [dataset], None, runtime)
    if len(planned) != 1:
        raise InputError(
            f"{spec.path}: a tuning spec must give one run per dataset (no [grid], one seed); it gives {len(planned)}"
        )
    # A val objective never evaluates test during trials: the best trial's test metrics are computed once,
    # by ``final_test_result`` when the study table is shown.
    changes: dict[str, Any] = {"train.selection": objective.split, "train.evaluate_test": objective.split == "test"}
    if val_from_train is not None:
        changes["data.val_from_train"] = val_from_train
    config = override(planned[0].config, changes)
    base = replace(planned[0], config=config, config_hash=config_hash(config), table=None)
    preflight(base.config)
    if objective.split == "val" and load_training_data(base.config).val is None:
        raise InputError(f"--val-from-train: {dataset} has no val split; hold out training identities, e.g. "
                         "--val-from-train 0.1")
    return base


def open_study(name: str, spec: Spec, base: PlannedRun, objective: Objective, registry: Registry,
               echo: Callable[[str], None]) -> optuna.Study:
    """Create or load the study, check it tunes ``base``, fail its dead trials and queue their values again."""
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(registry.url),
        direction=spec.tune.direction,
        pruner=build_pruner(spec.tune.pruner),
        load_if_exists=True,
    )
    _check_or_mark_study(study, spec.name, base, str(objective), objective.split == "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    requeued = requeue_interrupted(study, registry)
    if requeued:
        echo(f"study {name}: trials {', '.join(map(str, requeued))} were interrupted; their values run again "
             "and resume from the run's last checkpoint")
    return study


def _count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _check_or_mark_study(study: optuna.Study, spec_name: str, base: PlannedRun, objective: str,
                         force_test: bool) -> None:
    """Record what a new study tunes; refuse to continue a study with another base config."""
    identity = {"spec": spec_name, "dataset": base.dataset, "preset": base.preset, "objective": objective,
                "forced_test": force_test, "val_from_train": base.config["data"]["val_from_train"],
                "base_config_hash": base.config_hash}
    existing = study.user_attrs
    if not existing:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        return
    for key, value in identity.items():
        if existing.get(key) == value:
            continue
        if key == "base_config_hash":
            change = "a different base config (the spec or its preset changed since)"
        else:
            change = f"{key} = {existing.get(key)!r}, not {value!r}"
        raise InputError(f"--study {study.study_name}: the study was created with {change}; continue it with the "
                         "same spec and options or choose another --study")



def tune_table(study_name: str, db_url: str | None = None):
    """(rich renderable, data dict) of a study: trials, best values, importances, best trial's test metrics."""
    study, registry = load_study(study_name, db_url)
    data = study_data(study, registry)
    return render_study(data), data
