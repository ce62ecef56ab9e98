"""One trial of a tuning study: its sampled values applied to the base config, run as a registry run.

Runs are content addressed: the trial keeps its run's id and hash in its user attributes, the run's
row label names the study and trial that created it, and a trial that draws the values of an existing
run reuses it (a done run replays its recorded epochs to the pruner). Trials interrupted by Ctrl-C or
a dead process are queued again with the same values (``requeue_interrupted``), so their run resumes
from its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import TrialState

from php_runner.engine.train import EpochRecord, StopTraining
from php_runner.errors import InputError
from php_runner.execute.child import EXIT_INTERRUPTED, EXIT_NOT_CLAIMED, execute_run
from php_runner.experiment.expand import config_hash, override
from php_runner.experiment.schema import (
    CategoricalParam,
    FloatParam,
    IntParam,
    PlannedRun,
    TuneSection,
)
from php_runner.store.records import RunRecord
from php_runner.store.registry import Registry
from php_runner.studies.study import Objective, TrialRunFailed, objective_value

BUSY_POLL_S = 10.0  # how often a trial checks on a run that another process is training


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



def run_trial(trial: optuna.Trial, base: PlannedRun, tune: TuneSection, objective: Objective,
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
