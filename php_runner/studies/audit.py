"""The protocol audit of a registry run or a checkpoint file: batch coupling, evaluation order, split
leakage and checkpoint selection, composed into one stored report.

The measurements live in the library (``engine/audit_measures.py``: batch independence, order
sensitivity, the batch-size sweep, chance R1; ``engine/split_audit.py``; ``engine/selection.py:
selection_audit``). ``run_audit`` composes them into one JSON-able report; ``audit_summary`` extracts
the few keys tables show; ``audit_run`` and ``audit_checkpoint`` load the model and its evaluation
settings from a registry run or a checkpoint file, and ``audit_run`` records the report.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from php_runner.data import PedesDataset, read_dataset
from php_runner.engine.audit_measures import (
    AuditSettings,
    Evaluations,
    batch_independence,
    batch_size_sweep,
    order_sensitivity,
)
from php_runner.engine.evaluation_model import prepare_for_evaluation
from php_runner.engine.metrics import QueryOutcomes
from php_runner.engine.selection import selection_audit
from php_runner.engine.split_audit import split_audit, split_views
from php_runner.errors import InputError
from php_runner.execute.checkpoints import verified_checkpoint
from php_runner.experiment.build import build_php_config
from php_runner.model.checkpoint import (
    extract_state_dict,
    load_checkpoint_file,
    load_model,
    load_state_dict_checked,
)
from php_runner.model.php import PHPModel
from php_runner.store.tables import AUDIT_ORDERED_SOURCE, AUDIT_SHUFFLED_SOURCE

SUMMARY_KEYS = ("batch_dependent", "r1_ordered", "r1_shuffled", "r1_shuffled_std", "r1_gap")


def run_audit(
    model,
    dataset: PedesDataset,
    settings: AuditSettings,
    selection: dict | None = None,
    evaluations: Evaluations | None = None,
) -> dict:
    """All four sections for ``model`` on ``dataset``'s test split, as one JSON-able report.

    ``selection`` is a ``selection_audit`` result (or ``None`` when nothing is known of the run).
    ``evaluations`` (from ``audit_evaluations``) keeps the per-query outcomes for the caller.
    """
    started = time.perf_counter()
    evaluations = evaluations or audit_evaluations(model, dataset, settings)
    order = order_sensitivity(model, dataset.test, settings, evaluations)
    sweep = batch_size_sweep(model, dataset.test, settings, evaluations=evaluations)
    independence = batch_independence(model, dataset.test, settings)
    return {
        "dataset": dataset.name,
        "coupling": model.coupling,
        "encoder": settings.eval.encoder or model.config.variant,
        "eval_batch_size": settings.eval.batch_size,
        "batch_dependent": independence["batch_dependent"],
        "r1_ordered": order["ordered"]["R1"],
        "r1_shuffled": order["shuffled"]["R1"],
        "r1_shuffled_std": order["shuffled"]["std"]["R1"],
        "r1_gap": order["r1_gap"],
        "batch_independence": independence,
        **order,
        "batch_size_sweep": sweep,
        "split": split_audit(split_views(dataset), settings.max_examples, settings.hash_workers),
        "selection": selection,
        "seconds": time.perf_counter() - started,
    }


def audit_evaluations(model, dataset: PedesDataset, settings: AuditSettings) -> Evaluations:
    return Evaluations(model, dataset.test, replace(settings.eval, order="annotation"))


def recorded_outcomes(evaluations: Evaluations) -> dict[str, QueryOutcomes]:
    """The audit's per-query outcomes at its own batch size, by registry source (ordered, each shuffled seed)."""
    return {AUDIT_ORDERED_SOURCE if order == "annotation" else AUDIT_SHUFFLED_SOURCE.format(seed=seed): outcomes
            for (order, seed), outcomes in evaluations.base_batch_outcomes().items()}


def audit_summary(report: dict) -> dict:
    """The keys a results table shows from a stored audit report."""
    return {key: report.get(key) for key in SUMMARY_KEYS}


# ----------------------------------------------------------------------------------------------
# Auditing a registry run or a checkpoint file


def selection_from_history(entries: Iterable, selection: str) -> dict:
    """``selection_audit`` over registry epoch entries (objects with ``epoch``, ``split``, ``metrics``)."""
    by_split: dict[str, dict[int, dict]] = defaultdict(dict)
    for entry in entries:
        if entry.split in ("test", "val") and "R1" in entry.metrics:
            by_split[entry.split][entry.epoch] = entry.metrics
    return selection_audit(by_split.get("test", {}), by_split.get("val") or None, selection)


def _checkpoint_of(registry, run) -> str:
    paths = {record.role: record.path for record in registry.checkpoints(run.id)}
    path = paths.get("best") or paths.get("last")
    if path is None:
        raise InputError(f"run {run.id}: no checkpoint recorded (status {run.status}); train it first")
    if not Path(path).is_file():
        raise InputError(f"run {run.id}: checkpoint {path} not found")
    return verified_checkpoint(registry, run, path)


def audit_run(
    registry,
    ref: int | str,
    data_root: str | Path | None = None,
    coupling: str | None = None,
    batch_size: int | None = None,
    seeds: int = 3,
    sample_size: int = 16,
    device: str = "auto",
    record: bool = True,
) -> dict:
    """Audit a registry run with its own checkpoint, config and evaluation settings; store the report.

    The split audit reads the dataset as annotated: a held-out val split (``val_from_train``)
    renumbers train pids, and identities are compared by annotation id.
    """
    run = registry.get_run(ref)
    config = run.config
    path = _checkpoint_of(registry, run)
    weights = extract_state_dict(load_checkpoint_file(path))
    classifier = weights.get("classifier.weight")
    model = PHPModel(build_php_config(config["model"], 0 if classifier is None else classifier.shape[0]))
    load_state_dict_checked(model, weights, source=path)
    train = config["train"]
    evaluation = prepare_for_evaluation(model, precision=train["precision"], device=device, coupling=coupling,
                                        batch_size=batch_size or train["test_batch_size"])
    root = data_root if data_root is not None else config.get("runtime", {}).get("data_root") or "."
    dataset = read_dataset(root, config["data"]["dataset"])
    settings = AuditSettings(
        eval=evaluation,
        train_batch_size=train["batch_size"],
        seeds=seeds,
        sample_size=sample_size,
    )
    selection = selection_from_history(registry.epochs(run.id), train["selection"])
    evaluations = audit_evaluations(model, dataset, settings)
    report = {"run": run.id, "checkpoint": path, **run_audit(model, dataset, settings, selection, evaluations)}
    if record:
        registry.record_audit(run.id, report, recorded_outcomes(evaluations))
    return report


def audit_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    dataset_name: str | None = None,
    config_yaml: str | Path | None = None,
    coupling: str | None = None,
    encoder: str | None = None,
    batch_size: int | None = None,
    seeds: int = 3,
    sample_size: int = 16,
    device: str = "auto",
    precision: str = "official",
) -> dict:
    """Audit a checkpoint file (ours or an official ``best.pth``, with its ``configs.yaml`` when given).

    Batch sizes and the selecting split come from the yaml (``test_batch_size``, ``batch_size``,
    ``val_dataset``), else the official defaults (64, 64, test).
    """
    model, info = load_model(checkpoint, config_yaml)
    yaml_values = info.get("yaml") or {}
    name = dataset_name or yaml_values.get("dataset_name")
    if name is None:
        raise InputError("--dataset: required when no configs.yaml names the dataset (dataset_name)")
    evaluation = prepare_for_evaluation(model, precision=precision, device=device, coupling=coupling, encoder=encoder,
                                        batch_size=batch_size or int(yaml_values.get("test_batch_size", 64)))
    dataset = read_dataset(data_root, name)
    settings = AuditSettings(
        eval=evaluation,
        train_batch_size=int(yaml_values.get("batch_size", 64)),
        seeds=seeds,
        sample_size=sample_size,
    )
    # A checkpoint file carries no per-epoch metrics: only the selecting split and the epoch are known.
    selection = {
        "selected_by": yaml_values.get("val_dataset", "test"),
        "epoch": info.get("epoch"),
        "epochs": 0,
        "rules": None,
        "r1_gaps": None,
    }
    return {"checkpoint": str(checkpoint), **run_audit(model, dataset, settings, selection)}
