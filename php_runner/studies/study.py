"""A tuning study's place in the registry database, its objective, and the objective's value of a trial run.

A study lives in Optuna's tables beside the registry's (the same database URL). Optuna's heartbeats
let a later process fail the trials of a dead one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from php_runner.engine.selection import RULE_OF_SELECTION
from php_runner.errors import InputError
from php_runner.store.database import shown_url
from php_runner.store.registry import Registry

# A trial whose process died without a heartbeat for this long is failed, then queued again.
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 600
SQLITE_LOCK_TIMEOUT_S = 60
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialRunFailed(Exception):
    """The run of a trial failed; ``str()`` is one line naming the trial, the run and its error."""


@dataclass(frozen=True)
class Objective:
    """The metric a study optimises: ``split.metric`` as written in ``[tune] objective``."""

    split: str
    metric: str

    @classmethod
    def parse(cls, text: str) -> Objective:
        split, _, metric = text.partition(".")
        return cls(split, metric)

    def __str__(self) -> str:
        return f"{self.split}.{self.metric}"

    @property
    def rule(self) -> str:
        """The registry result rule of the checkpoint training selects on this split."""
        return RULE_OF_SELECTION[self.split]



def storage_note(url: str) -> str | None:
    """The plain warning for SQLite storage, None for a server database."""
    if url.startswith("sqlite"):
        return (
            f"study storage {shown_url(url)} is SQLite: processes on this machine can share the study; "
            "for several machines use a server database, e.g. --db postgresql://user@host/php_run"
        )
    return None



def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on the registry database; heartbeats let a later run fail dead trials."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are stable since 2.9
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S
        )



def load_study(study_name: str, db_url: str | None = None) -> tuple[optuna.Study, Registry]:
    registry = Registry(db_url)
    storage = open_storage(registry.url)
    names = optuna.study.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise InputError(f"study {study_name!r}: not in {shown_url(registry.url)} (studies there: {known})")
    return optuna.load_study(study_name=study_name, storage=storage), registry



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
