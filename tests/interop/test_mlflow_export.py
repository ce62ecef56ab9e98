"""MLflow export against a real local store (SQLite), read back with MlflowClient."""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass

import pytest

from php_runner.errors import InputError
from php_runner.interop.mlflow_export import ExportRun, export_runs, flatten_config

CONFIG = {"model": {"cnum": 9, "clip": "tiny", "image_size": [48, 24]}, "loss": {"names": ["sdm", "itc"]},
          "train": {"lr": 3e-6, "img_aug": True}, "runtime": {"clip_weights": None}}


@dataclass
class EpochMetrics:
    """The registry's EpochMetrics shape (``Registry.epochs``)."""

    epoch: int
    split: str
    values: dict


EPOCHS = [
    EpochMetrics(1, "train", {"sdm_loss": 2.5, "total": 3.0, "lr": 1e-3, "seconds": 4.0}),
    EpochMetrics(1, "test", {"R1": 10.0, "R5": 30.0, "R10": 50.0, "mAP": 12.5, "mINP": 4.0}),
    EpochMetrics(2, "train", {"sdm_loss": 1.5, "total": 2.0, "lr": 5e-4, "seconds": 3.5}),
    EpochMetrics(2, "test", {"R1": 20.0, "R5": 40.0, "R10": 60.0, "mAP": 22.5, "mINP": 8.0}),
]
RESULTS = {"best-on-test": {"epoch": 2, "split": "test",
                            "metrics": {"R1": 20.0, "R5": 40.0, "R10": 60.0, "mAP": 22.5, "mINP": 8.0}}}


def test_flattened_params_are_dotted_strings():
    assert flatten_config(CONFIG) == {"model.cnum": "9", "model.clip": "tiny", "model.image_size": "[48, 24]",
                                      "loss.names": '["sdm", "itc"]', "train.lr": "3e-06", "train.img_aug": "true",
                                      "runtime.clip_weights": "null"}


def test_missing_extra_is_a_one_line_input_error(monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(InputError, match=r"pip install 'php-runner\[mlflow\]'"):
        export_runs("sqlite:///x.db", [])


@pytest.fixture
def store(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'php-runner[mlflow]')")
    return f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artefacts")


def test_export_reads_back_params_metrics_results_and_artefacts(tmp_path, store):
    from mlflow.tracking import MlflowClient

    uri, artefacts = store
    log, yaml_file, checkpoint = tmp_path / "train_log.txt", tmp_path / "configs.yaml", tmp_path / "best.pth"
    log.write_text("IRRA INFO: start training\n")
    yaml_file.write_text("cnum: 9\n")
    checkpoint.write_bytes(b"weights")
    run = ExportRun(run_id=7, name="20260301_123005_headline-PHP_seed1", config=CONFIG, epochs=EPOCHS,
                    results=RESULTS, artefacts=[yaml_file, log, tmp_path / "absent.txt"], checkpoint=checkpoint,
                    tags={"spec": "headline", "seed": 1}, started_at=1_700_000_000.0, ended_at=1_700_000_100.0)
    (exported,) = export_runs(uri, [run], artifact_location=artefacts)
    assert exported.status == "exported"

    client = MlflowClient(tracking_uri=uri)
    data = client.get_run(exported.mlflow_run_id)
    assert data.info.run_name == run.name and data.info.status == "FINISHED"
    assert data.info.start_time == 1_700_000_000_000 and data.info.end_time == 1_700_000_100_000
    assert data.data.params == flatten_config(CONFIG)
    assert json.loads(data.data.params["loss.names"]) == ["sdm", "itc"]
    assert data.data.tags["php_run.run_id"] == "7" and data.data.tags["php_run.spec"] == "headline"

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(exported.mlflow_run_id, key),
                                                  key=lambda m: m.step)]

    assert history("epoch/loss") == [(1, 3.0), (2, 2.0)]
    assert history("epoch/sdm_loss") == [(1, 2.5), (2, 1.5)]
    assert history("epoch/lr") == [(1, 1e-3), (2, 5e-4)]
    assert history("test/R1") == [(1, 10.0), (2, 20.0)]
    assert history("test/mINP") == [(1, 4.0), (2, 8.0)]
    assert data.data.metrics["best-on-test/R1"] == 20.0 and data.data.metrics["best-on-test/epoch"] == 2
    names = sorted(item.path for item in client.list_artifacts(exported.mlflow_run_id))
    assert names == ["configs.yaml", "train_log.txt"]  # no checkpoint unless asked; missing files skipped


def test_checkpoint_on_request_and_no_duplicate_on_re_export(tmp_path, store):
    from mlflow.tracking import MlflowClient

    uri, artefacts = store
    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes(b"weights")
    first = ExportRun(run_id=1, name="a", config=CONFIG, checkpoint=checkpoint, status="failed")
    second = ExportRun(run_id=2, name="b", config=CONFIG, status="interrupted")
    (done,) = export_runs(uri, [first], artifact_location=artefacts, include_checkpoints=True)
    again = export_runs(uri, [first, second], artifact_location=artefacts)
    assert [item.status for item in again] == ["unchanged", "exported"] and again[0].mlflow_run_id == done.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    assert [item.path for item in client.list_artifacts(done.mlflow_run_id)] == ["best.pth"]
    assert client.get_run(done.mlflow_run_id).info.status == "FAILED"
    assert client.get_run(again[1].mlflow_run_id).info.status == "KILLED"
    experiment = client.get_experiment_by_name("php-run")
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_a_bad_store_is_a_one_line_input_error(tmp_path, store):
    with pytest.raises(InputError, match="--tracking-uri") as caught:
        export_runs(f"file://{tmp_path / 'mlruns'}", [ExportRun(run_id=1, name="a", config=CONFIG)])
    assert "\n" not in str(caught.value)
