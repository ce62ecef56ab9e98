"""Export recorded runs to an MLflow tracking store (the optional ``mlflow`` extra).

Each php-run run becomes one MLflow run in an experiment (default ``php-run``): its resolved config as
params (flattened dotted names, ``model.cnum``), tags naming it (``php_run.run_id``, spec, row, dataset,
seed, preset, config hash, status), per-epoch metrics at ``step = epoch`` under the TensorBoard tag
names (``epoch/loss``, ``epoch/sdm_loss``, ``epoch/lr``, ``epoch/seconds``, ``test/R1``, ``val/mAP``, ...),
the selected results (``best-on-test/R1``, ..., ``best-on-test/epoch``) and artefacts (the run folder's
``configs.yaml`` and ``train_log.txt``; ``best.pth`` only when asked). A run already exported to the
experiment (same ``php_run.run_id`` tag) is left as it is, so exporting again adds only new runs.

Works offline with a local database store (``sqlite:///mlflow.db``); MLflow 3 refuses to create runs in
its deprecated file store (``./mlruns``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from php_runner.errors import InputError
from php_runner.interop.records import TOTAL_LOSS, meter_name

EXPERIMENT = "php-run"
RUN_ID_TAG = "php_run.run_id"
INSTALL_HINT = "MLflow export needs the mlflow extra: pip install 'php-runner[mlflow]'"
STATUS = {"done": "FINISHED", "failed": "FAILED"}  # every other php-run status ends as KILLED
TRAIN_SPLIT = "train"  # the registry's split holding losses, lr and seconds
METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
PARAMS_PER_BATCH = 100


class EpochValuesLike(Protocol):
    """One epoch's values of one split (the registry's ``EpochMetrics``: ``epochs(run_id)``)."""

    epoch: int
    split: str
    values: Mapping[str, float]


@dataclass(frozen=True)
class ExportRun:
    """Plain data for one run to export; the CLI maps a registry run into it.

    ``epochs``: ``Registry.epochs(run_id)``; ``results``: ``Registry.results(run_id)``
    (``{rule: {"epoch", "split", "metrics"}}``); ``artefacts``: files to attach (missing ones are skipped);
    ``checkpoint``: attached only with ``include_checkpoints``; ``started_at``/``ended_at``: UNIX seconds.
    """

    run_id: int | str
    name: str
    config: Mapping[str, Any]
    epochs: Sequence[EpochValuesLike] = ()
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    artefacts: Sequence[Path] = ()
    checkpoint: Path | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    status: str = "done"
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class Exported:
    """What became of one run: ``exported`` or ``unchanged`` (it was in the experiment already)."""

    run_id: int | str
    mlflow_run_id: str
    status: str


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model.cnum": "9", "loss.names": '["sdm", "itc", "aux"]', ...}``: MLflow params are strings."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(list(value) if isinstance(value, tuple) else value)
    return flat


def epoch_metrics(epochs: Sequence[EpochValuesLike]) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` per epoch value: losses under ``epoch/<meter>``, metrics under ``<split>/<name>``."""
    rows = []
    for row in epochs:
        for name, value in row.values.items():
            if row.split == TRAIN_SPLIT:
                key = f"epoch/{meter_name(name) if name == TOTAL_LOSS or name.endswith('_loss') else name}"
            else:
                key = f"{row.split}/{name}"
            rows.append((key, float(value), int(row.epoch)))
    return rows


def result_metrics(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, float]]:
    """``(<rule>/<metric>, value)`` and ``(<rule>/epoch, epoch)`` for each selection rule."""
    rows = []
    for rule, result in results.items():
        rows += [(f"{rule}/{name}", float(value)) for name, value in result["metrics"].items()]
        rows.append((f"{rule}/epoch", float(result["epoch"])))
    return rows


def _mlflow_client_class():
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return MlflowClient, MlflowException


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def export_runs(tracking_uri: str, runs: Sequence[ExportRun], *, experiment: str = EXPERIMENT,
                artifact_location: str | None = None, include_checkpoints: bool = False) -> list[Exported]:
    """Export ``runs`` to the MLflow store at ``tracking_uri`` (e.g. ``sqlite:///mlflow.db``).

    ``artifact_location`` is where a new experiment keeps artefacts (MLflow's default otherwise: below the
    current folder). Bad URIs and store errors are one-line ``InputError``s naming ``--tracking-uri``.
    """
    client_class, mlflow_error = _mlflow_client_class()
    try:
        client = client_class(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifact_location)
        return [_export_one(client, experiment_id, run, include_checkpoints) for run in runs]
    except mlflow_error as error:
        raise InputError(f"--tracking-uri {tracking_uri}: {_first_line(error)}") from None


def _export_one(client, experiment_id: str, run: ExportRun, include_checkpoints: bool) -> Exported:
    from mlflow.entities import Metric, Param

    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run.run_id}'",
                                  max_results=1)
    if existing:
        return Exported(run.run_id, existing[0].info.run_id, "unchanged")
    tags = {RUN_ID_TAG: str(run.run_id), "php_run.status": run.status,
            **{f"php_run.{key}": str(value) for key, value in run.tags.items()}}
    start = int((run.started_at or time.time()) * 1000)
    created = client.create_run(experiment_id, start_time=start, tags=tags, run_name=run.name)
    mlflow_id = created.info.run_id
    params = [Param(key, value) for key, value in flatten_config(run.config).items()]
    metrics = [Metric(key, value, start, step) for key, value, step in epoch_metrics(run.epochs)]
    metrics += [Metric(key, value, start, 0) for key, value in result_metrics(run.results)]
    for first in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(mlflow_id, params=params[first:first + PARAMS_PER_BATCH])
    for first in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(mlflow_id, metrics=metrics[first:first + METRICS_PER_BATCH])
    files = [Path(path) for path in run.artefacts]
    if include_checkpoints and run.checkpoint is not None:
        files.append(Path(run.checkpoint))
    for path in files:
        if path.is_file():
            client.log_artifact(mlflow_id, str(path))
    end = int(run.ended_at * 1000) if run.ended_at is not None else None
    client.set_terminated(mlflow_id, status=STATUS.get(run.status, "KILLED"), end_time=end)
    return Exported(run.run_id, mlflow_id, "exported")

