"""Tuning: search-space parsing, real median-pruner decisions, studies on the registry end to end."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from rich.console import Console

from php_runner.data import write_synthetic
from php_runner.engine.metrics import metrics_from_outcomes
from php_runner.engine.train import EpochRecord, StopTraining
from php_runner.errors import InputError
from php_runner.store.registry import Registry
from php_runner.experiment.specs import expand, load_spec, shipped_folder
from php_runner.studies import study_table, trials
from php_runner.studies.study import Objective, storage_note
from php_runner.studies.study_table import study_data
from php_runner.studies.trials import PruningReporter, requeue_interrupted, sample_params
from php_runner.studies.tuning import build_pruner, check_objective, tune, tune_table

EXPERIMENTS = shipped_folder()
TEST_EPOCHS = 2

SPACE = """
[tune.space."train.lr"]
type = "float"
low = 1e-4
high = 1e-2
log = true

[tune.space."loss.aux_factor"]
type = "categorical"
choices = [0.0, 0.5, 1.0]
"""


def write_spec(folder: Path, name: str, tune_header: str, space: str = SPACE) -> Path:
    """A spec extending the shipped base, beside a copy of the presets with a 2-epoch tiny preset."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXPERIMENTS / "base.toml", folder / "base.toml")
    presets = (EXPERIMENTS / "presets.toml").read_text()
    tiny_epochs = "[tiny.train]\nepochs = 4\n"
    assert tiny_epochs in presets, "the tiny preset changed; update this test's epoch override"
    (folder / "presets.toml").write_text(presets.replace(tiny_epochs, f"[tiny.train]\nepochs = {TEST_EPOCHS}\n"))
    path = folder / f"{name}.toml"
    path.write_text(f'extends = "base"\n\n[tune]\n{tune_header}\n{space}')
    return path


def record(epoch: int, split: str | None, r1: float) -> EpochRecord:
    metrics = {} if split is None else {split: {"R1": r1, "R5": r1, "R10": r1, "mAP": r1, "mINP": r1}}
    return EpochRecord(epoch=epoch, lr=1e-3, losses={"total": 1.0}, metrics=metrics, seconds=0.1)


# ---- search space ------------------------------------------------------------------------------


def test_shipped_tuning_spec_parses_into_optuna_distributions():
    spec = load_spec(EXPERIMENTS / "tune_php.toml")
    assert spec.tune.objective == "val.R1" and spec.tune.pruner == "median"
    trial = optuna.create_study().ask()
    params = sample_params(trial, spec.tune)
    assert set(params) == {"train.lr", "loss.aux_factor", "model.cnum", "model.num_experts", "model.topk",
                           "model.efp_layers"}
    distributions = trial.distributions
    assert distributions["train.lr"] == FloatDistribution(1e-6, 3e-5, log=True)
    assert distributions["model.cnum"] == IntDistribution(3, 12, step=3)
    assert distributions["model.num_experts"] == CategoricalDistribution([2, 4, 6, 8])
    assert 1e-6 <= params["train.lr"] <= 3e-5 and params["model.cnum"] in (3, 6, 9, 12)
    assert params["model.topk"] <= params["model.num_experts"]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ('[tune.space."train.lr"]\ntype = "float"\nlow = 1e-2\nhigh = 1e-4\n', "must be below high"),
        ('[tune.space."train.lr"]\ntype = "float"\nlow = 0.0\nhigh = 1e-2\nlog = true\n', "log-scale"),
        ('[tune.space."model.cnum"]\ntype = "int"\nlow = 6\nhigh = 3\n', "must not exceed"),
        ('[tune.space."model.topk"]\ntype = "categorical"\nchoices = []\n', "tune.space.model.topk"),
        ('[tune.space."model.nope"]\ntype = "int"\nlow = 1\nhigh = 3\n', "unknown field 'nope'"),
        ('[tune.space."train.lr"]\ntype = "normal"\nlow = 1\nhigh = 3\n', "tune.space.train.lr"),
    ],
)
def test_bad_search_space_is_refused_naming_the_field(tmp_path, space, message):
    path = write_spec(tmp_path, "bad", "trials = 2", space)
    with pytest.raises(InputError, match=message) as caught:
        load_spec(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_objective_is_refused(tmp_path):
    path = write_spec(tmp_path, "bad", 'objective = "train.loss"\ntrials = 2')
    with pytest.raises(InputError, match="tune.objective"):
        load_spec(path)


def test_test_objective_needs_force():
    with pytest.raises(InputError, match="--force-test"):
        check_objective(Objective.parse("test.R1"), force_test=False, source="spec.toml")
    check_objective(Objective.parse("test.R1"), force_test=True, source="spec.toml")
    check_objective(Objective.parse("val.mAP"), force_test=False, source="spec.toml")


def test_storage_note_only_for_sqlite():
    assert "this machine" in storage_note("sqlite:///registry.db")
    assert storage_note("postgresql://user@host/php_run") is None


# ---- pruning -----------------------------------------------------------------------------------


def feed(trial: optuna.Trial, values: list[float], split: str = "val") -> PruningReporter:
    reporter = PruningReporter(trial, Objective("val", "R1"))
    for epoch, value in enumerate(values, start=1):
        reporter(record(epoch, split, value))
    return reporter


def test_median_pruner_stops_a_bad_trial_and_keeps_a_good_one():
    study = optuna.create_study(direction="maximize", pruner=build_pruner("median", startup_trials=2))
    for values in ([40.0, 50.0, 60.0], [44.0, 54.0, 64.0]):
        trial = study.ask()
        feed(trial, values)
        study.tell(trial, values[-1])

    bad = study.ask()
    reporter = PruningReporter(bad, Objective("val", "R1"))
    reporter(record(1, "test", 99.0))  # test metrics never reach the pruner
    with pytest.raises(StopTraining):
        reporter(record(1, "val", 1.0))
    assert reporter.pruned_at == 1
    assert bad.should_prune()
    study.tell(bad, state=TrialState.PRUNED)

    good = study.ask()
    assert feed(good, [45.0, 55.0, 65.0]).pruned_at is None
    assert study.trials[2].intermediate_values == {1: 1.0}


def test_median_pruner_waits_for_its_startup_trials():
    study = optuna.create_study(direction="maximize", pruner=build_pruner("median", startup_trials=2))
    first = study.ask()
    feed(first, [50.0])
    study.tell(first, 50.0)
    assert feed(study.ask(), [0.0]).pruned_at is None  # only one finished trial so far


def test_no_pruner_never_prunes():
    study = optuna.create_study(direction="maximize", pruner=build_pruner("none"))
    for value in (50.0, 60.0):
        trial = study.ask()
        feed(trial, [value])
        study.tell(trial, value)
    assert feed(study.ask(), [0.0]).pruned_at is None


def test_importances_need_two_completed_trials_with_different_values(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")

    def lr_matters(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("train.lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("loss.aux_factor", [0.0, 1.0])
        return 1000 * lr

    study = optuna.create_study(direction="maximize")
    study.optimize(lr_matters, n_trials=1)
    assert study_data(study, registry)["importance_note"] == "needs at least 2 completed trials (has 1)"
    study.optimize(lr_matters, n_trials=11)
    data = study_data(study, registry)
    assert data["importance_note"] is None
    assert data["importances"]["train.lr"] > data["importances"]["loss.aux_factor"]
    assert data["best"]["value"] == max(t.value for t in study.trials) and data["best"]["test"] is None

    flat = optuna.create_study(direction="maximize")
    flat.optimize(lambda trial: 0 * trial.suggest_float("train.lr", 1e-4, 1e-2) + 50.0, n_trials=3)
    assert "same objective value" in study_data(flat, registry)["importance_note"]


# ---- studies on the registry ---------------------------------------------------------------------


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """A working directory with tiny synthetic ICFG-PEDES data (no val split) and a registry URL."""
    monkeypatch.chdir(tmp_path)
    data_root = tmp_path / "data"
    write_synthetic(data_root, "ICFG-PEDES", num_ids=4)
    return {"root": tmp_path, "data_root": str(data_root), "db": f"sqlite:///{tmp_path / 'registry.db'}"}


def run_tune(workspace, spec: Path, **options):
    options = {"preset": "tiny", "val_from_train": 0.25, "runtime": {"data_root": workspace["data_root"]},
               "db_url": workspace["db"], "echo": lambda line: None, **options}
    return tune(spec, "ICFG-PEDES", **options)


@pytest.mark.slow
def test_study_runs_trials_as_registry_runs_and_continues(workspace, monkeypatch):
    spec = write_spec(workspace["root"] / "specs", "tune_tiny", 'objective = "val.R1"\ntrials = 2')
    lines: list[str] = []
    outcome = run_tune(workspace, spec, echo=lines.append)
    assert (outcome.finished_before, outcome.finished_now) == (0, 2)
    assert any("SQLite" in line and "server database" in line for line in lines)

    registry = Registry(workspace["db"])
    runs = registry.list_runs(kind="trial")
    assert len(runs) == 2 and all(run.status == "done" for run in runs)
    study = optuna.load_study(study_name=outcome.study_name, storage=workspace["db"])
    first_trials = study.get_trials()
    assert [t.user_attrs["run_id"] for t in first_trials] == [run.id for run in runs]
    for trial, run in zip(first_trials, runs):
        assert run.row_label == f"{outcome.study_name} trial {trial.number}"
        assert run.config["train"]["selection"] == "val" and run.config["data"]["val_from_train"] == 0.25
        assert run.config["train"]["lr"] == trial.params["train.lr"]
        assert run.config["loss"]["aux_factor"] == trial.params["loss.aux_factor"]
        assert run.config["train"]["evaluate_test"] is False
        assert {row.split for row in registry.epochs(run.id)} == {"train", "val"}  # test untouched while tuning
        val_by_epoch = {row.epoch: row.metrics["R1"] for row in registry.epochs(run.id) if row.split == "val"}
        assert sorted(val_by_epoch) == list(range(1, TEST_EPOCHS + 1))
        assert trial.intermediate_values == val_by_epoch  # the pruner saw every val epoch
        if trial.state == TrialState.COMPLETE:
            assert trial.value == val_by_epoch[registry.results(run.id)["best-on-val"]["epoch"]]
    assert study.user_attrs["forced_test"] is False and study.user_attrs["objective"] == "val.R1"

    again = run_tune(workspace, spec, trials=3)
    assert (again.study_name, again.finished_before, again.finished_now) == (outcome.study_name, 2, 1)
    study = optuna.load_study(study_name=outcome.study_name, storage=workspace["db"])
    assert len(study.trials) == 3
    assert [(t.params, t.value) for t in study.trials[:2]] == [(t.params, t.value) for t in first_trials]
    assert len(registry.list_runs(kind="trial")) == 3

    met = run_tune(workspace, spec, trials=3)
    assert met.finished_now == 0 and len(registry.list_runs(kind="trial")) == 3

    renderable, data = tune_table(outcome.study_name, workspace["db"])
    assert [row["number"] for row in data["trials"]] == [0, 1, 2]
    assert data["forced_test"] is False and data["objective"] == "val.R1"
    assert data["counts"]["complete"] == 3  # fewer finished trials than the median pruner's startup
    best_run = data["best"]["run_id"]
    assert data["best"]["value"] == max(t["value"] for t in data["trials"])
    best_checkpoint = next(c for c in registry.checkpoints(best_run) if c.role == "best")
    assert data["best"]["test"]["split"] == "test"
    assert data["best"]["test"]["epoch"] == registry.results(best_run)["best-on-val"]["epoch"] == best_checkpoint.epoch
    assert data["best"]["test"] == registry.results(best_run)["final-test"]  # evaluated once, then recorded
    final = registry.results(best_run)["final-test"]
    per_query = registry.outcomes(best_run, "final-test", final["epoch"], "test")
    assert per_query is not None and metrics_from_outcomes(per_query) == pytest.approx(
        final["metrics"], abs=1e-9)  # the outcomes behind the recorded metrics
    test_runs = [run.id for run in registry.list_runs(kind="trial") if "final-test" in registry.results(run.id)]
    assert test_runs == [best_run]  # only the best trial ever saw the test split
    monkeypatch.setattr(study_table, "evaluate", lambda *args, **kwargs: pytest.fail("test evaluated twice"))
    assert tune_table(outcome.study_name, workspace["db"])[1]["best"]["test"] == data["best"]["test"]
    if len({row["value"] for row in data["trials"]}) == 1:  # the tiny synthetic task is often solved by all
        assert "same objective value" in data["importance_note"]
    else:
        assert set(data["importances"]) == {"train.lr", "loss.aux_factor"}
    console = Console(record=True, width=200)
    console.print(renderable)
    assert outcome.study_name in console.export_text()

    with pytest.raises(InputError, match="val_from_train"):
        run_tune(workspace, spec, trials=4, study_name=outcome.study_name, val_from_train=0.5)


@pytest.mark.slow
def test_test_objective_is_refused_unless_forced_and_then_marked(workspace):
    spec = write_spec(workspace["root"] / "specs", "tune_on_test", 'objective = "test.R1"\ntrials = 1')
    with pytest.raises(InputError, match="--force-test"):
        run_tune(workspace, spec)
    outcome = run_tune(workspace, spec, force_test=True, val_from_train=None)
    assert outcome.study_name.endswith("-forced-test")
    renderable, data = tune_table(outcome.study_name, workspace["db"])
    assert data["forced_test"] is True
    assert data["importances"] is None and "at least 2 completed trials" in data["importance_note"]
    console = Console(record=True, width=200)
    console.print(renderable)
    assert "FORCED" in console.export_text()
    run = Registry(workspace["db"]).list_runs(kind="trial")[0]
    assert run.config["train"]["selection"] == "test"


def test_dataset_without_val_split_needs_val_from_train(workspace):
    spec = write_spec(workspace["root"] / "specs", "tune_tiny", "trials = 1")
    with pytest.raises(InputError, match="--val-from-train"):
        run_tune(workspace, spec, val_from_train=None)


def test_invalid_drawn_combination_names_the_search_space(workspace):
    space = ('[tune.space."model.topk"]\ntype = "categorical"\nchoices = [3]\n'
             '[tune.space."model.num_experts"]\ntype = "categorical"\nchoices = [2]\n')
    spec = write_spec(workspace["root"] / "specs", "tune_invalid", "trials = 1", space)
    with pytest.raises(InputError, match="tune.space: trial 0 drew"):
        run_tune(workspace, spec)
    assert Registry(workspace["db"]).list_runs(kind="trial") == []


def test_unknown_study_lists_the_known_ones(workspace):
    with pytest.raises(InputError, match="studies there: none"):
        tune_table("nope", workspace["db"])


def test_interrupted_trial_is_queued_again_once_with_its_values(workspace):
    spec = write_spec(workspace["root"] / "specs", "tune_tiny", "trials = 1")
    registry = Registry(workspace["db"])
    planned = expand(load_spec(spec), "tiny", ["ICFG-PEDES"], None, {"data_root": workspace["data_root"]})[0]
    run = registry.plan_run(planned, kind="trial")
    registry.mark_failed(run.id, "interrupted (resumes from its last checkpoint)")
    study = optuna.create_study(storage=workspace["db"], study_name="s", direction="maximize")
    trial = study.ask()
    lr = trial.suggest_float("train.lr", 1e-4, 1e-2, log=True)
    trial.set_user_attr("run_id", run.id)
    study.tell(trial, state=TrialState.FAIL)

    assert requeue_interrupted(study, registry) == [0]
    assert requeue_interrupted(study, registry) == []
    retry = study.ask()
    assert retry.suggest_float("train.lr", 1e-4, 1e-2, log=True) == lr
    assert retry.user_attrs["retry_of"] == 0


def test_trial_waits_for_a_run_that_another_process_trains(workspace, monkeypatch):
    monkeypatch.setattr(trials, "BUSY_POLL_S", 0.05)
    spec = write_spec(workspace["root"] / "specs", "tune_tiny", "trials = 1")
    registry = Registry(workspace["db"])
    planned = expand(load_spec(spec), "tiny", ["ICFG-PEDES"], None, {"data_root": workspace["data_root"]})[0]
    run = registry.plan_run(planned, kind="trial")
    assert registry.claim_run(run.id, "another-host:1")

    def other_process_finishes() -> None:
        for epoch, r1 in ((1, 10.0), (2, 20.0)):
            registry.record_epoch(run.id, epoch, "train", {"lr": 1e-3})
            registry.record_epoch(run.id, epoch, "val", {"R1": r1})
        registry.mark_done(run.id)

    timer = threading.Timer(0.3, other_process_finishes)
    timer.start()
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    lines: list[str] = []
    done = trials._execute_or_wait(run, registry, PruningReporter(trial, Objective("val", "R1")), None, 0,
                                   lines.append)
    timer.join()
    assert done.status == "done"
    assert any("being trained by another-host:1" in line for line in lines)
    study.tell(trial, 20.0)
    assert study.trials[0].intermediate_values == {1: 10.0, 2: 20.0}
