"""Importing the PHP authors' released checkpoints into the registry (spec 8).

Each run folder of a released tree (``studies/released.py``) is checked against its yaml and its
folder name (``studies/released_checks.py``), evaluated with the official batching (the yaml's
``test_batch_size``, annotation order, the official fp16 layout), optionally audited, and recorded as
a registry run of kind ``imported`` per table cell it fills, with the config of
``studies/imported_config.py``. Re-importing the same checkpoint with the same settings finds the
recorded runs and evaluates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from php_runner.data import PedesDataset, read_dataset
from php_runner.errors import InputError
from php_runner.model.config import PHPConfig
from php_runner.store.claims import this_worker
from php_runner.store.records import RunRecord
from php_runner.store.registry import Registry
from php_runner.store.tables import AUDIT_ORDERED_SOURCE, EVALUATION_SOURCE
from php_runner.studies.imported_config import (
    EvaluationKey,
    imported_config,
    official_selection,
    plain,
    php_run_import,
    planned_run,
    validate_sections,
)
from php_runner.studies.released import (
    CHECKPOINT_NAME,
    YAML_NAME,
    Cell,
    ReleasedRun,
    assign_headline,
    discover,
)
from php_runner.studies.released_checks import (
    SolverEra,
    disagreements,
    infer_released_config,
    is_counter_buffer,
    parameter_names,
    solver_era,
)

RESULT_RULE = "best-on-test"  # best.pth is the epoch with the best test R1 (spec 7)
CHECKPOINT_ROLE = "released"


@dataclass
class ImportOutcome:
    """What happened to one folder. ``status``: imported | audited | unchanged | busy | skipped | failed."""

    label: str
    status: str
    reason: str | None = None
    cells: tuple[Cell, ...] = ()
    encoder: str | None = None
    sharing: str | None = None
    solver: SolverEra | None = None
    metrics: dict | None = None
    audit: dict | None = None  # audit summary (audit.audit_summary)
    run_ids: tuple[int, ...] = ()
    counter_buffers: bool = False
    sha256: str | None = None


@dataclass(frozen=True)
class ImportOptions:
    """How a tree is imported: where the datasets are, whether to audit, on which device."""

    data_root: Path
    audit: bool = True
    device: str = "cpu"
    num_workers: int = 0
    data_source: str = "real"  # the config's data.source: "synthetic" for trees evaluated on synthetic data
    command: str | None = None
    audit_seeds: int = 3


def import_logs(
    logs_dir: str | Path,
    registry: Registry,
    options: ImportOptions,
    datasets: Sequence[str] | None = None,
    on_outcome: Callable[[ImportOutcome], None] | None = None,
) -> list[ImportOutcome]:
    """Import every released run below ``logs_dir``; one outcome per folder, skipped ones included."""
    runs, skipped = discover(logs_dir, datasets)
    outcomes = [ImportOutcome(item.label, "skipped", item.reason) for item in skipped]
    for outcome in outcomes:
        if on_outcome is not None:
            on_outcome(outcome)
    cells = assign_headline(runs)
    loaded: dict[str, PedesDataset | InputError] = {}
    for run in runs:
        if run.dataset not in loaded:
            try:
                loaded[run.dataset] = read_dataset(options.data_root, run.dataset)
            except InputError as err:
                loaded[run.dataset] = err
        data = loaded[run.dataset]
        if isinstance(data, InputError):
            outcome = ImportOutcome(run.label, "skipped", f"dataset: {data}", cells[run], run.meaning.encoder)
        else:
            outcome = import_run(run, cells[run], data, registry, options)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


@dataclass(frozen=True)
class CheckedRelease:
    """A released checkpoint that agrees with its yaml and its folder name."""

    yaml_values: dict
    state_dict: dict
    php_config: PHPConfig
    scheduler: object  # the stored scheduler state, read for the solver era
    epoch: int


def import_run(
    run: ReleasedRun, cells: Iterable[Cell], dataset: PedesDataset, registry: Registry, options: ImportOptions
) -> ImportOutcome:
    """Check, evaluate, audit and record one released run folder (bad files give a skipped outcome)."""
    from php_runner.files import file_sha256

    cells = tuple(cells)
    outcome = ImportOutcome(run.label, "skipped", cells=cells, encoder=run.meaning.encoder)
    try:
        release = check_release(run, outcome)
    except InputError as err:
        outcome.reason = str(err)
        return outcome
    if release is None:
        return outcome
    outcome.solver = solver_era(release.scheduler, parameter_names(release.state_dict), release.yaml_values)
    outcome.sha256 = file_sha256(run.folder / CHECKPOINT_NAME)
    evaluation = EvaluationKey(batch_size=int(release.yaml_values["test_batch_size"]), encoder=run.meaning.encoder,
                               image_size=tuple(release.php_config.clip.image_size))
    try:
        configs = [
            imported_config(
                php_config=release.php_config, yaml_values=release.yaml_values, era=outcome.solver.era,
                dataset=run.dataset, cell=cell, sha256=outcome.sha256, evaluation=evaluation,
                data_root=options.data_root, data_source=options.data_source, device=options.device,
                num_workers=options.num_workers,
            )
            for cell in cells
        ]
        if run.meaning.php_run is not None:
            own, evaluation = php_run_import(run.meaning.php_run, configs[0]["runtime"], evaluation)
            configs = [own for _ in configs]
        validate_sections(configs[0], run.folder / YAML_NAME)
    except InputError as err:
        outcome.reason = str(err)
        return outcome
    records = [registry.plan_run(planned_run(cell, config, run.dataset), kind="imported")
               for cell, config in zip(cells, configs)]
    outcome.run_ids = tuple(record.id for record in records)
    return record_cells(run, release, evaluation, dataset, records, registry, options, outcome)


def check_release(run: ReleasedRun, outcome: ImportOutcome) -> CheckedRelease | None:
    """Read the folder's yaml and checkpoint and check them against each other and the folder name;
    None (with ``outcome.reason``) where they disagree. Bad files raise InputError."""
    from php_runner.model.checkpoint import (
        extract_state_dict,
        load_checkpoint_file,
        read_official_yaml,
    )

    yaml_values = read_official_yaml(run.folder / YAML_NAME)
    for key in ("loss_names", "test_batch_size"):
        if key not in yaml_values:
            raise InputError(f"{run.folder / YAML_NAME}: no {key}")
    # The payload's optimiser state is twice the size of the weights: only the parts needed are kept.
    payload = load_checkpoint_file(run.folder / CHECKPOINT_NAME)
    state_dict = extract_state_dict(payload)
    inferred = infer_released_config(state_dict, yaml_values)
    outcome.sharing = inferred.sharing
    outcome.counter_buffers = any(is_counter_buffer(key) for key in state_dict)
    problems = disagreements(run.meaning, run.dataset, yaml_values, inferred)
    if problems:
        outcome.reason = "; ".join(problems)
        return None
    coupling = run.meaning.php_run["config"]["model"]["coupling"] if run.meaning.php_run else "official"
    php_config = replace(inferred, variant=run.meaning.encoder, coupling=coupling)
    _check_fit(php_config, state_dict, run.folder / CHECKPOINT_NAME)
    return CheckedRelease(yaml_values, state_dict, php_config, payload.get("scheduler"), _epoch(payload))


def record_cells(run: ReleasedRun, release: CheckedRelease, evaluation: EvaluationKey, dataset: PedesDataset,
                 records: list[RunRecord], registry: Registry, options: ImportOptions,
                 outcome: ImportOutcome) -> ImportOutcome:
    """Evaluate (or audit) once for the cells this process claims and record the results in each."""
    worker = this_worker()
    pending = [record for record in records if record.status != "done"]
    claimed = [record for record in pending if registry.claim_run(record.id, worker)]
    ready = [record for record in records if record.status == "done"] + claimed
    to_audit = [record for record in ready if options.audit and registry.latest_audit(record.id) is None]
    if not claimed and not to_audit:
        outcome.status = "busy" if pending else "unchanged"
        if pending:
            outcome.reason = "another process is importing this checkpoint"
        else:
            _read_back(outcome, registry, records[0].id)
        return outcome
    try:
        model = _build_model(release.php_config, release.state_dict)
        settings = _eval_settings(model, evaluation, options)
        report, audited = (_run_audit(model, dataset, settings, release.yaml_values, release.epoch, options)
                           if to_audit else (None, {}))
        if claimed:
            metrics, outcomes = ((report["ordered"], audited[AUDIT_ORDERED_SOURCE]) if report is not None
                                 else _evaluate(model, dataset, settings))
            provenance = _provenance(run, release.yaml_values, outcome, evaluation, options)
        for record in claimed:
            registry.record_result(record.id, RESULT_RULE, release.epoch, "test", metrics)
            registry.record_outcomes(record.id, EVALUATION_SOURCE, release.epoch, "test", outcomes)
            registry.record_checkpoint(record.id, str(run.folder / CHECKPOINT_NAME), outcome.sha256, release.epoch,
                                       CHECKPOINT_ROLE)
            registry.record_provenance(record.id, provenance)
        for record in to_audit:
            registry.record_audit(record.id, report, audited)
        for record in claimed:
            registry.mark_done(record.id)
    except Exception as err:  # noqa: BLE001 - one broken checkpoint must not stop the rest of the tree
        error = " ".join(f"{type(err).__name__}: {err}".split())
        for record in claimed:
            registry.mark_failed(record.id, error, worker)
        outcome.status, outcome.reason = "failed", error
        return outcome
    except BaseException as err:  # interrupted: leave the runs claimable for the next import
        for record in claimed:
            registry.mark_failed(record.id, f"{type(err).__name__}", worker)
        raise
    outcome.status = "imported" if claimed else "audited"
    if len(claimed) < len(pending):
        outcome.reason = "some cells are being imported by another process"
    _read_back(outcome, registry, ready[0].id)
    return outcome


def _read_back(outcome: ImportOutcome, registry: Registry, run_id: int) -> None:
    outcome.metrics = registry.results(run_id)[RESULT_RULE]["metrics"]
    outcome.audit = _audit_summary(registry, run_id)


def _build_model(php_config: PHPConfig, state_dict: dict):
    import torch

    from php_runner.model.checkpoint import load_state_dict_checked
    from php_runner.model.php import PHPModel

    with torch.device("meta"):  # every tensor is written by the strict load below
        model = PHPModel(php_config)
    model = model.to_empty(device="cpu")
    load_state_dict_checked(model, state_dict)
    return model


def _check_fit(php_config: PHPConfig, state_dict: dict, path: Path) -> None:
    """Weights that do not fit the model they describe are a bad file, refused before any run is planned."""
    import torch

    from php_runner.model.checkpoint import fitted_state_dict
    from php_runner.model.php import PHPModel

    with torch.device("meta"):  # shapes only: nothing is allocated
        model = PHPModel(php_config)
    fitted_state_dict(model, state_dict, source=str(path))


def _eval_settings(model, evaluation: EvaluationKey, options: ImportOptions):
    from php_runner.engine.evaluation_model import prepare_for_evaluation

    return prepare_for_evaluation(model, precision=evaluation.precision, device=options.device,
                                  batch_size=evaluation.batch_size, encoder=evaluation.encoder,
                                  order=evaluation.order, num_workers=options.num_workers)


def _epoch(payload: dict) -> int:
    """The best epoch the official trainer stored; 0 where the file does not say."""
    epoch = payload.get("epoch")
    return epoch if isinstance(epoch, int) else 0


def _evaluate(model, dataset: PedesDataset, settings) -> tuple:
    from php_runner.engine.evaluate import evaluate

    return evaluate(model, dataset.test, settings, outcomes=True)


def _run_audit(
    model, dataset: PedesDataset, settings, yaml_values: dict, epoch: int, options: ImportOptions
) -> tuple[dict, dict]:
    """The audit report and its per-query outcomes by registry source."""
    from php_runner.engine.audit_measures import AuditSettings
    from php_runner.studies.audit import audit_evaluations, recorded_outcomes, run_audit

    audit_settings = AuditSettings(eval=settings, train_batch_size=int(yaml_values.get("batch_size", 64)),
                                   seeds=options.audit_seeds)
    evaluations = audit_evaluations(model, dataset, audit_settings)
    report = run_audit(model, dataset, audit_settings, evaluations=evaluations)
    # Only the selected epoch of a released run is known, so the other selection rules stay empty.
    report["selection"] = {
        "selected_by": official_selection(yaml_values),
        "epochs": None,
        "rules": {"best-on-test": {"epoch": epoch, "test": report["ordered"]}, "best-on-val": None,
                  "last": None},
        "r1_gaps": {"test_minus_val": None, "test_minus_last": None},
    }
    return report, recorded_outcomes(evaluations)


def _audit_summary(registry: Registry, run_id: int) -> dict | None:
    from php_runner.studies.audit import audit_summary

    latest = registry.latest_audit(run_id)
    return None if latest is None else audit_summary(latest.report)


def _provenance(run: ReleasedRun, yaml_values: dict, outcome: ImportOutcome, evaluation: EvaluationKey,
                options: ImportOptions) -> dict:
    from php_runner.execute.provenance import provenance_info

    return {
        **provenance_info(options.device, options.command),
        "source": "released checkpoint",
        "folder": str(run.folder),
        "checkpoint_sha256": outcome.sha256,
        "solver_era": outcome.solver.era,
        "solver_evidence": outcome.solver.evidence,
        "counter_buffers": outcome.counter_buffers,
        "sharing": outcome.sharing,
        "encoder": evaluation.encoder,
        "yaml": plain(yaml_values),
    }
