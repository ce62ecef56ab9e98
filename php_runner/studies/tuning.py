"""Hyperparameter tuning with Optuna, stored in the registry's own database.

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

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from php_runner.engine.evaluate import EvalSettings, evaluate
from php_runner.engine.train import RULE_OF_SELECTION, EpochRecord, StopTraining, resolve_device
from php_runner.errors import InputError
from php_runner.model.checkpoint import load_model
from php_runner.model.precision import apply_precision
from php_runner.store.registry import Registry
from php_runner.store.records import RunRecord
from php_runner.store.database import shown_url
from php_runner.execute.child import EXIT_INTERRUPTED, EXIT_NOT_CLAIMED, execute_run
from php_runner.experiment.build import load_training_data
from php_runner.execute.preflight import preflight
from php_runner.execute.checkpoints import verified_checkpoint
from php_runner.experiment.schema import CategoricalParam, FloatParam, IntParam, PlannedRun, TuneSection
from php_runner.experiment.expand import config_hash, override
from php_runner.experiment.specs import expand, load_spec

# Optuna's MedianPruner defaults: no pruning before 5 finished trials, from the first epoch on.
MEDIAN_STARTUP_TRIALS = 5
# A trial whose process died without a heartbeat for this long is failed, then queued again.
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 600
SQLITE_LOCK_TIMEOUT_S = 60
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
BUSY_POLL_S = 10.0  # how often a trial checks on a run that another process is training


class TrialRunFailed(Exception):
    """The run of a trial failed; ``str()`` is one line naming the trial, the run and its error."""


@dataclass(frozen=True)
class Objective:
    """The metric a study optimises: ``split.metric`` as written in ``[tune] objective``."""

    split: str
    metric: str

    @classmethod
    def parse(cls, text: str) -> "Objective":
        split, _, metric = text.partition(".")
        return cls(split, metric)

    def __str__(self) -> str:
        return f"{self.split}.{self.metric}"

    @property
    def rule(self) -> str:
        """The registry result rule of the checkpoint training selects on this split."""
        return RULE_OF_SELECTION[self.split]


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


def suggest(trial: optuna.Trial, path: str, param: FloatParam | IntParam | CategoricalParam) -> Any:
    """One value of the search space, drawn by ``trial`` under the dotted config ``path``."""
    if isinstance(param, FloatParam):
        return trial.suggest_float(path, param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return trial.suggest_int(path, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_categorical(path, param.choices)


def sample_params(trial: optuna.Trial, tune: TuneSection) -> dict[str, Any]:
    return {path: suggest(trial, path, param) for path, param in tune.space.items()}


class PruningReporter:
    """``on_epoch`` callback: reports the objective per evaluated epoch, stops training when pruned.

    Epochs without the objective's split (not evaluated) report nothing.
    """

    def __init__(self, trial: optuna.Trial, objective: Objective):
        self.trial = trial
        self.objective = objective
        self.pruned_at: int | None = None

    def __call__(self, record: EpochRecord) -> None:
        metrics = record.metrics.get(self.objective.split)
        if not metrics:
            return
        self.trial.report(float(metrics[self.objective.metric]), record.epoch)
        if self.trial.should_prune():
            self.pruned_at = record.epoch
            raise StopTraining()


def check_objective(objective: Objective, force_test: bool, source: str) -> None:
    """Refuse tuning on the test split unless forced."""
    if objective.split == "test" and not force_test:
        raise InputError(
            f"{source}: tune.objective: {objective} tunes on the test split; use a val objective "
            "(with --val-from-train for datasets without a val split) or pass --force-test"
        )


def storage_note(url: str) -> str | None:
    """The plain warning for SQLite storage, None for a server database."""
    if url.startswith("sqlite"):
        return (
            f"study storage {shown_url(url)} is SQLite: processes on this machine can share the study; "
            "for several machines use a server database, e.g. --db postgresql://user@host/php_run"
        )
    return None


def default_study_name(spec_name: str, dataset: str, preset: str, val_from_train: float, force_test: bool) -> str:
    name = f"{spec_name}-{dataset}-{preset}"
    if val_from_train:
        name += f"-val{val_from_train:g}"
    return name + ("-forced-test" if force_test else "")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on the registry database; heartbeats let a later run fail dead trials."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are stable since 2.9
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S
        )


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

    planned = expand(spec, preset, [dataset], None, runtime)
    if len(planned) != 1:
        raise InputError(
            f"{spec.path}: a tuning spec must give one run per dataset (no [grid], one seed); it gives {len(planned)}"
        )
    # A val objective never evaluates test during trials: the best trial's test metrics are computed once,
    # by ``final_test_result`` when the study table is shown.
    changes: dict[str, Any] = {"train.selection": objective.split, "train.evaluate_test": on_test}
    if val_from_train is not None:
        changes["data.val_from_train"] = val_from_train
    config = override(planned[0].config, changes)
    base = replace(planned[0], config=config, config_hash=config_hash(config), table=None)
    preflight(base.config)
    if objective.split == "val" and load_training_data(base.config).val is None:
        raise InputError(f"--val-from-train: {dataset} has no val split; hold out training identities, e.g. "
                         "--val-from-train 0.1")

    registry = Registry(db_url)
    note = storage_note(registry.url)
    if note:
        echo(note)
    name = study_name or default_study_name(
        spec.name, dataset, preset, base.config["data"]["val_from_train"], on_test
    )
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(registry.url),
        direction=spec.tune.direction,
        pruner=build_pruner(spec.tune.pruner),
        load_if_exists=True,
    )
    _check_or_mark_study(study, spec.name, base, str(objective), on_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    requeued = requeue_interrupted(study, registry)
    if requeued:
        echo(f"study {name}: trials {', '.join(map(str, requeued))} were interrupted; their values run again "
             "and resume from the run's last checkpoint")

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
        lambda trial: _run_trial(trial, base, spec.tune, objective, registry, name, command, echo),
        n_trials=remaining,
        callbacks=[optuna.study.MaxTrialsCallback(budget, states=FINISHED)],
    )
    return StudyOutcome(name, budget, finished_before, _count_finished(study) - finished_before, note)


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


def requeue_interrupted(study: optuna.Study, registry: Registry) -> list[int]:
    """Queue again the values of failed trials whose run is not done, once each."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    requeued = []
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried or "run_id" not in trial.user_attrs:
            continue
        if registry.get_run(trial.user_attrs["run_id"]).status == "done":
            continue
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        requeued.append(trial.number)
    return requeued


def _run_trial(trial: optuna.Trial, base: PlannedRun, tune: TuneSection, objective: Objective,
               registry: Registry, study_name: str, command: str | None, echo: Callable[[str], None]) -> float:
    params = sample_params(trial, tune)
    try:
        config = override(base.config, params)
    except InputError as err:
        raise InputError(f"tune.space: trial {trial.number} drew {params}, an invalid config ({err})") from None
    planned = replace(base, config=config, config_hash=config_hash(config),
                      row_label=f"{study_name} trial {trial.number}")
    run = registry.plan_run(planned, kind="trial")
    trial.set_user_attr("run_id", run.id)
    trial.set_user_attr("config_hash", run.config_hash)
    values = ", ".join(f"{path}={value:g}" if isinstance(value, float) else f"{path}={value}"
                       for path, value in params.items())
    echo(f"trial {trial.number}: run {run.id} ({run.short_hash}) {values}")
    reporter = PruningReporter(trial, objective)
    run = _execute_or_wait(run, registry, reporter, command, trial.number, echo)
    if reporter.pruned_at is not None or _stopped_early(registry, run):
        trial.set_user_attr("pruned_at_epoch", reporter.pruned_at or _last_epoch(registry, run))
        echo(f"trial {trial.number}: pruned after epoch {trial.user_attrs['pruned_at_epoch']}")
        raise optuna.TrialPruned()
    value = objective_value(registry, run.id, objective)
    echo(f"trial {trial.number}: {objective} = {value:.2f}")
    return value


def _execute_or_wait(run: RunRecord, registry: Registry, reporter: PruningReporter, command: str | None,
                     number: int, echo: Callable[[str], None]) -> RunRecord:
    """Train the trial's run; when it is done already, or another live process trains it (a shared
    study drew the same values), take its recorded epochs instead."""
    while True:
        run = registry.get_run(run.id)
        if run.status == "done":
            echo(f"trial {number}: run {run.id} is done already; using its recorded epochs")
            _replay(reporter, registry, run)
            return run
        code = execute_run(run.id, registry.url, command=command, on_epoch=reporter)
        if code == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if code == EXIT_NOT_CLAIMED:
            # Another process holds the run; it may finish between our claim and this check, so the loop
            # re-reads the run and replays it once it is done.
            holder = registry.get_run(run.id)
            if holder.status == "running":
                echo(f"trial {number}: run {run.id} is being trained by {holder.worker}; waiting for it")
                time.sleep(BUSY_POLL_S)
            continue
        run = registry.get_run(run.id)
        if run.status != "done":
            raise TrialRunFailed(f"trial {number}: run {run.id} is {run.status}: {run.error or 'no error recorded'}")
        return run


def _replay(reporter: PruningReporter, registry: Registry, run: RunRecord) -> None:
    """Report a finished run's recorded epochs to the trial, as training would have."""
    for row in registry.epochs(run.id):
        if row.split == reporter.objective.split:
            try:
                reporter(EpochRecord(epoch=row.epoch, lr=0.0, losses={}, metrics={row.split: row.metrics}, seconds=0.0))
            except StopTraining:
                return


def _last_epoch(registry: Registry, run: RunRecord) -> int:
    return max((row.epoch for row in registry.epochs(run.id) if row.split == "train"), default=0)


def _stopped_early(registry: Registry, run: RunRecord) -> bool:
    """A done run that trained fewer epochs than its config asks for was pruned by an earlier trial."""
    return _last_epoch(registry, run) < run.config["train"]["epochs"]


def objective_value(registry: Registry, run_id: int, objective: Objective) -> float:
    """The objective metric at the epoch training selected on the objective's split."""
    results = registry.results(run_id)
    if objective.rule not in results:
        raise TrialRunFailed(f"run {run_id}: no {objective.rule} result recorded (was {objective.split} evaluated?)")
    epoch = results[objective.rule]["epoch"]
    for row in registry.epochs(run_id):
        if row.epoch == epoch and row.split == objective.split:
            return float(row.metrics[objective.metric])
    raise TrialRunFailed(f"run {run_id}: no {objective.split} metrics recorded for epoch {epoch}")


# --------------------------------------------------------------------------------------------
# The study table
# --------------------------------------------------------------------------------------------


def load_study(study_name: str, db_url: str | None = None) -> tuple[optuna.Study, Registry]:
    registry = Registry(db_url)
    storage = open_storage(registry.url)
    names = optuna.study.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise InputError(f"study {study_name!r}: not in {shown_url(registry.url)} (studies there: {known})")
    return optuna.load_study(study_name=study_name, storage=storage), registry


def study_data(study: optuna.Study, registry: Registry) -> dict:
    """Everything ``tune_table`` shows, as plain data."""
    attrs = study.user_attrs
    objective = Objective.parse(attrs.get("objective", "val.R1"))
    trials = [_trial_row(trial, registry) for trial in study.get_trials(deepcopy=False)]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = None
    if complete:
        best_trial = study.best_trial
        run_id = best_trial.user_attrs.get("run_id")
        test = final_test_result(registry, run_id, objective) if run_id is not None else None
        best = {"trial": best_trial.number, "value": best_trial.value, "params": best_trial.params, "run_id": run_id,
                "test": test}
    importances, importance_note = _importances(study, complete)
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        **{key: attrs.get(key) for key in ("spec", "dataset", "preset", "objective", "val_from_train")},
        "forced_test": bool(attrs.get("forced_test", False)),
        "storage_note": storage_note(registry.url),
        "counts": {state.name.lower(): sum(t["state"] == state.name.lower() for t in trials) for state in TrialState},
        "trials": trials,
        "best": best,
        "importances": importances,
        "importance_note": importance_note,
    }


FINAL_TEST_RULE = "final-test"  # one of registry.RULES


def final_test_result(registry: Registry, run_id: int, objective: Objective) -> dict:
    """The test metrics of a trial run's selected checkpoint, evaluated at most once and then read back.

    Trials with a val objective never evaluate test; the first request evaluates ``best.pth`` on the
    test split with the run's own precision and test batch size and records it under ``final-test``.
    A forced test objective already has them under its selection rule.
    """
    results = registry.results(run_id)
    for rule in (FINAL_TEST_RULE, objective.rule):
        if rule in results and results[rule]["split"] == "test":
            return results[rule]
    run = registry.get_run(run_id)
    best = next(c for c in registry.checkpoints(run_id) if c.role == "best")
    model, info = load_model(verified_checkpoint(registry, run, best.path))
    train = run.config["train"]
    apply_precision(model, train["precision"])
    settings = EvalSettings(batch_size=train["test_batch_size"], device=str(resolve_device(run.config["runtime"].get(
        "device", "auto"))), precision=train["precision"], image_size=model.config.clip.image_size)
    metrics = evaluate(model, load_training_data(run.config).test, settings)
    registry.record_result(run_id, FINAL_TEST_RULE, info["epoch"], "test", metrics)
    return registry.results(run_id)[FINAL_TEST_RULE]


def _trial_row(trial: FrozenTrial, registry: Registry) -> dict:
    run_id = trial.user_attrs.get("run_id")
    run = registry.get_run(run_id) if run_id is not None else None
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": trial.params,
        "epochs_reported": len(trial.intermediate_values),
        "pruned_at_epoch": trial.user_attrs.get("pruned_at_epoch"),
        "retry_of": trial.user_attrs.get("retry_of"),
        "run_id": run_id,
        "run_status": run.status if run else None,
    }


def _importances(study: optuna.Study, complete: list[FrozenTrial]) -> tuple[dict[str, float] | None, str | None]:
    """PED-ANOVA importances over the completed trials, or why there are none yet.

    PED-ANOVA needs no scikit-learn (Optuna's default fANOVA does) and is deterministic.
    """
    if len(complete) < 2:
        return None, f"needs at least 2 completed trials (has {len(complete)})"
    if len({trial.value for trial in complete}) == 1:
        return None, f"not informative: all {len(complete)} completed trials have the same objective value"
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        with warnings.catch_warnings():
            # With few trials the top quantile is every trial; the equal importances say so themselves.
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as err:
        return None, f"not computable yet ({' '.join(str(err).split())})"
    if not importances or any(math.isnan(v) for v in importances.values()):
        return None, "not computable yet (the completed trials do not vary the parameters)"
    return dict(importances), None


def tune_table(study_name: str, db_url: str | None = None):
    """(rich renderable, data dict) of a study: trials, best values, importances, best trial's test metrics."""
    study, registry = load_study(study_name, db_url)
    data = study_data(study, registry)
    return render_study(data), data


def render_study(data: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    header = Text(f"study {data['study']}: {data['spec']} on {data['dataset']} ({data['preset']} preset), "
                  f"{data['direction']} {data['objective']}", style="bold")
    parts.append(header)
    if data["val_from_train"]:
        parts.append(Text(f"val split: {data['val_from_train']:g} of the training identities held out"))
    if data["forced_test"]:
        parts.append(Text("FORCED: tuned on the test split (--force-test); its test numbers are not an unbiased "
                          "estimate", style="bold red"))
    counts = ", ".join(f"{n} {state}" for state, n in data["counts"].items() if n)
    parts.append(Text(f"trials: {counts or 'none'}"))

    trials = Table(title="trials")
    for column in ("#", "state", data["objective"], "epochs", "run", "params"):
        trials.add_column(column)
    for row in data["trials"]:
        state = row["state"] + (f" (retry of {row['retry_of']})" if row["retry_of"] is not None else "")
        trials.add_row(
            str(row["number"]), state, _number(row["value"]), str(row["epochs_reported"]),
            "" if row["run_id"] is None else f"{row['run_id']} ({row['run_status']})",
            ", ".join(f"{k}={_number(v)}" for k, v in row["params"].items()),
        )
    parts.append(trials)

    best = data["best"]
    if best is None:
        parts.append(Text("best: no completed trial yet"))
    else:
        table = Table(title=f"best trial {best['trial']} ({data['objective']} {_number(best['value'])}, "
                            f"run {best['run_id']})")
        table.add_column("parameter")
        table.add_column("value")
        table.add_column("importance")
        importances = data["importances"] or {}
        for key, value in best["params"].items():
            table.add_row(key, _number(value), _number(importances.get(key)))
        parts.append(table)
        if data["importance_note"]:
            parts.append(Text(f"importances: {data['importance_note']}"))
        test = best["test"]
        if test is None:
            parts.append(Text("best trial's test metrics: not recorded"))
        else:
            metrics = Table(title=f"best trial's test metrics (checkpoint of epoch {test['epoch']}, "
                                  f"selected on {Objective.parse(data['objective']).split})")
            for name in test["metrics"]:
                metrics.add_column(name)
            metrics.add_row(*(f"{v:.2f}" for v in test["metrics"].values()))
            parts.append(metrics)
    if data["storage_note"]:
        parts.append(Text(data["storage_note"], style="dim"))
    return Group(*parts)


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
