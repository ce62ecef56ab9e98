"""The table of a tuning study: its trials, the best trial's values and test metrics, parameter importances."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from php_runner.engine.evaluate import evaluate
from php_runner.engine.evaluation_model import prepare_for_evaluation
from php_runner.execute.checkpoints import verified_checkpoint
from php_runner.experiment.build import load_training_data
from php_runner.model.checkpoint import load_model
from php_runner.store.registry import Registry
from php_runner.store.tables import FINAL_TEST_SOURCE
from php_runner.studies.study import Objective, storage_note


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
    test split with the run's own precision and test batch size and records it, with its per-query outcomes
    (for intervals and paired tests), under ``final-test``.
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
    settings = prepare_for_evaluation(model, precision=train["precision"], batch_size=train["test_batch_size"],
                                      device=run.config["runtime"].get("device", "auto"))
    metrics, per_query = evaluate(model, load_training_data(run.config).test, settings, outcomes=True)
    registry.record_outcomes(run_id, FINAL_TEST_SOURCE, info["epoch"], "test", per_query)
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
