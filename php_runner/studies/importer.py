"""Importing the PHP authors' released checkpoints into the registry (spec 8).

A released tree is laid out as ``logs/<dataset>/<folder>/{best.pth, configs.yaml}``; the folder name
says which paper table cell the checkpoint fills (``interpret_folder``). Each checkpoint is checked
against its yaml and its folder name, evaluated with the official batching (the yaml's
``test_batch_size``, annotation order, the official fp16 layout), optionally audited, and recorded as
a registry run of kind ``imported`` per table cell it fills.

An imported run's config has the sections of a trained run's config (model inferred from the
checkpoint's keys, loss and train from the yaml) plus an ``imported`` section holding the
checkpoint's sha256, the cell and the evaluation settings. All of them are in the config hash, so
re-importing the same checkpoint with the same settings finds the recorded run and evaluates nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from php_runner.data import DATASET_NAMES, PedesDataset, read_dataset
from php_runner.engine.optim import SOLVERS, param_group_rule
from php_runner.errors import InputError
from php_runner.model.checkpoint import COUNTER_SUFFIXES
from php_runner.model.config import CLIP_PRESETS, ClipConfig, PHPConfig
from php_runner.store.registry import Registry
from php_runner.store.claims import this_worker

CHECKPOINT_NAME = "best.pth"
YAML_NAME = "configs.yaml"
SPEC_NAME = "released"  # the spec_name of imported runs: they come from no spec file
PRESET = "released"
OFFICIAL_SEED = 1  # set_seed(1 + rank) in the official training (spec 10)
PAPER_CNUM = 9
RESULT_RULE = "best-on-test"  # best.pth is the epoch with the best test R1 (spec 7)
CHECKPOINT_ROLE = "released"

# Substrings of the parameters that only the V1-era solver gives their own learning rate (spec 5).
MOE_KEYS = ("feed_forward.experts", "feed_forward.input_gate", "feed_forward.task_gate")

# Folder-name patterns of spec 8. NS runs come from Correction's train_ns.py, which names its output
# <YYYYmmdd_HHMMSS>_<name>_ns; the README shortens that to <date>_php_ns, so the time is optional.
LOSS_FOLDERS = ("itc+aux", "sdm+aux", "sdm+itc+aux")
CNUM_FOLDER = re.compile(r"^sdm\+itc\+aux_cnum(\d+)$")
MODULE_FOLDER = re.compile(r"^ablation_(base|crfm|efp)$")
NS_FOLDER = re.compile(r"^\d{8}(_\d{6})?_.+_ns$")


@dataclass(frozen=True)
class Cell:
    """One row of one table, with the table and row keys of ``paper_results.toml``."""

    table: str
    row: str


# Every table's headline row is the paper configuration (sdm+itc+aux, cnum 9, beta 0.5, shared); one
# released checkpoint per dataset fills the rows that have no folder of their own.
HEADLINE_CELLS = (Cell("headline", "PHP"), Cell("module", "full"), Cell("sharing", "shared"), Cell("beta", "0.5"))


class UnknownFolderError(InputError):
    """A run folder whose name follows none of the released naming conventions."""


@dataclass(frozen=True)
class FolderMeaning:
    """What a released folder name says about its checkpoint."""

    encoder: str  # full | base | crfm | efp: the encoder pair the official evaluation used
    sharing: str  # shared | separate
    cells: tuple[Cell, ...]  # the cells of the folder's own table
    loss_names: frozenset[str] | None = None  # None where the name says nothing about the losses
    cnum: int | None = None  # None where the name says nothing about cnum
    headline_rank: int | None = None  # lower wins the headline cells; None: never the headline


def interpret_folder(name: str) -> FolderMeaning:
    """The cell, encoder and implied settings of a released folder name (spec 8); unknown names raise."""
    if name in LOSS_FOLDERS:
        losses = frozenset(name.split("+"))
        # The unsuffixed sdm+itc+aux run is the headline only where no _cnum9 run exists (spec 8:
        # _cnum9 is the SOTA-table model).
        rank = 1 if name == "sdm+itc+aux" else None
        return FolderMeaning("full", "shared", (Cell("loss", name),), losses, PAPER_CNUM, rank)
    match = CNUM_FOLDER.match(name)
    if match:
        cnum = int(match.group(1))
        return FolderMeaning(
            "full", "shared", (Cell("cnum", str(cnum)),), frozenset({"sdm", "itc", "aux"}), cnum,
            0 if cnum == PAPER_CNUM else None,
        )
    match = MODULE_FOLDER.match(name)
    if match:
        return FolderMeaning(match.group(1), "shared", (Cell("module", match.group(1)),))
    if NS_FOLDER.match(name):
        return FolderMeaning("full", "separate", (Cell("sharing", "separate"),))
    raise UnknownFolderError(
        f"folder {name!r}: not a released run name (itc+aux, sdm+aux, sdm+itc+aux, sdm+itc+aux_cnumN, "
        "ablation_base|crfm|efp, <date>[_<time>]_<name>_ns)"
    )


# ----------------------------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True)
class ReleasedRun:
    """One run folder of a released tree."""

    dataset: str
    folder: Path
    meaning: FolderMeaning

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.folder.name}"


@dataclass(frozen=True)
class Skipped:
    """A folder that was not imported, and why."""

    label: str
    reason: str


def discover(
    logs_dir: str | Path, datasets: Sequence[str] | None = None
) -> tuple[list[ReleasedRun], list[Skipped]]:
    """Every ``<dataset>/<folder>`` below ``logs_dir`` holding a ``best.pth`` or a ``configs.yaml``.

    Folders outside ``datasets`` (when given) are left out silently; folders under a parent that is
    not a dataset name, without both files, or with an unknown name are returned as skipped.
    """
    root = Path(logs_dir)
    if not root.is_dir():
        raise InputError(f"LOGS_DIR {root}: not a folder")
    for name in datasets or ():
        if name not in DATASET_NAMES:
            raise InputError(f"--datasets: unknown dataset {name!r}; expected {', '.join(DATASET_NAMES)}")
    folders = sorted({path.parent for marker in (CHECKPOINT_NAME, YAML_NAME) for path in root.rglob(marker)})
    if not folders:
        raise InputError(f"LOGS_DIR {root}: no {CHECKPOINT_NAME} or {YAML_NAME} anywhere below it")
    found, skipped = [], []
    for folder in folders:
        dataset = folder.parent.name
        label = f"{dataset}/{folder.name}"
        if datasets and dataset not in datasets:
            continue
        if dataset not in DATASET_NAMES:
            skipped.append(Skipped(str(folder), f"parent folder {dataset!r} is not a dataset name "
                                                f"({', '.join(DATASET_NAMES)})"))
            continue
        missing = [name for name in (CHECKPOINT_NAME, YAML_NAME) if not (folder / name).is_file()]
        if missing:
            skipped.append(Skipped(label, f"no {' and no '.join(missing)}"))
            continue
        try:
            found.append(ReleasedRun(dataset, folder, interpret_folder(folder.name)))
        except UnknownFolderError as err:
            skipped.append(Skipped(label, str(err)))
    return found, skipped


def assign_headline(runs: Sequence[ReleasedRun]) -> dict[ReleasedRun, tuple[Cell, ...]]:
    """The cells each run fills: its own, plus the headline cells for one run per dataset."""
    cells = {run: run.meaning.cells for run in runs}
    by_dataset: dict[str, list[ReleasedRun]] = {}
    for run in runs:
        if run.meaning.headline_rank is not None:
            by_dataset.setdefault(run.dataset, []).append(run)
    for candidates in by_dataset.values():
        chosen = min(candidates, key=lambda run: run.meaning.headline_rank)
        cells[chosen] = chosen.meaning.cells + HEADLINE_CELLS
    return cells


# ----------------------------------------------------------------------------------------------
# Checks of a checkpoint against its yaml and its folder name


def is_counter_buffer(key: str) -> bool:
    """True for the R1 MoE usage counters: buffers, so no optimiser group has them."""
    return key.endswith(COUNTER_SUFFIXES)


def parameter_names(state_dict: dict) -> list[str]:
    """The checkpoint's parameter names in state-dict order, which is the optimiser's group order."""
    return [key for key in state_dict if not is_counter_buffer(key)]


def infer_released_config(state_dict: dict, yaml_values: dict) -> PHPConfig:
    """The checkpoint's architecture, with topk, heads and input size from the yaml.

    The yaml's cnum, num_experts and moe_layers are left out: ``disagreements`` compares them with the
    weights and reports every contradiction at once. CLIP head counts are not in any shape, so they
    come from the named backbone whose widths the weights have.
    """
    from php_runner.model.checkpoint import CheckpointError, infer_config

    conv = state_dict.get("base_model.visual.conv1.weight")
    projection = state_dict.get("base_model.text_projection")
    widths = None if conv is None or projection is None else (conv.shape[0], *projection.shape)
    named = next((clip for clip in CLIP_PRESETS.values()
                  if widths == (clip.vision_width, clip.text_width, clip.embed_dim)), None)
    if named is None:
        raise CheckpointError(f"checkpoint: backbone widths {widths} match neither {', '.join(CLIP_PRESETS)}")
    shape_keys = ("cnum", "num_experts", "moe_layers")
    return infer_config(state_dict, {key: value for key, value in yaml_values.items() if key not in shape_keys},
                        vision_heads=named.vision_heads, text_heads=named.text_heads)


def disagreements(
    meaning: FolderMeaning, dataset: str, yaml_values: dict, inferred: PHPConfig
) -> list[str]:
    """Where the yaml, the checkpoint's shapes and the folder name contradict each other."""
    problems = []
    yaml_vs_checkpoint = (("cnum", "cnum"), ("num_experts", "num_experts"), ("moe_layers", "efp_layers"),
                          ("reduction", "reduction"))
    for yaml_key, config_field in yaml_vs_checkpoint:
        if yaml_key in yaml_values and yaml_values[yaml_key] != getattr(inferred, config_field):
            problems.append(f"configs.yaml {yaml_key} {yaml_values[yaml_key]} but the checkpoint has "
                            f"{getattr(inferred, config_field)}")
    if meaning.cnum is not None and yaml_values.get("cnum") != meaning.cnum:
        problems.append(f"the folder name means cnum {meaning.cnum} but configs.yaml has {yaml_values.get('cnum')}")
    if meaning.loss_names is not None:
        yaml_losses = frozenset(str(yaml_values.get("loss_names", "")).split("+"))
        if yaml_losses != meaning.loss_names:
            problems.append(f"the folder name means losses {'+'.join(sorted(meaning.loss_names))} but "
                            f"configs.yaml has {yaml_values.get('loss_names')}")
    if inferred.sharing != meaning.sharing:
        problems.append(f"the folder name means {meaning.sharing} CRFM/EFP but the checkpoint's keys are "
                        f"{inferred.sharing}")
    if yaml_values.get("dataset_name", dataset) != dataset:
        problems.append(f"the folder is under {dataset} but configs.yaml has dataset_name "
                        f"{yaml_values['dataset_name']}")
    return problems


# ----------------------------------------------------------------------------------------------
# Which solver trained the checkpoint


@dataclass(frozen=True)
class SolverEra:
    """``v1`` (transformer/MoE lr groups), ``head`` (IRRA rules) or ``unknown``, with the evidence."""

    era: str
    evidence: str


# yaml option -> keyword of optim.param_group_rule
_RULE_OPTIONS = ("weight_decay", "weight_decay_bias", "bias_lr_factor", "lr_factor", "transformer_lr_factor",
                 "moe_lr_factor")


def solver_era(scheduler: Any, names: Sequence[str], yaml_values: dict) -> SolverEra:
    """Which solver version built the optimiser groups, read from the scheduler's ``base_lrs`` (spec 5, 8).

    The MoE weight groups decide: at lr x moe_lr_factor only the V1-era solver puts them, at lr only
    the HEAD (IRRA) solver. The evidence also says whether every other group follows that solver's rules.
    """
    base_lrs = scheduler.get("base_lrs") if isinstance(scheduler, dict) else None
    if not base_lrs:
        return SolverEra("unknown", "the checkpoint has no scheduler base_lrs")
    if len(base_lrs) != len(names):
        return SolverEra("unknown", f"{len(base_lrs)} scheduler groups for {len(names)} parameters")
    missing = [key for key in ("lr", *_RULE_OPTIONS) if key not in yaml_values]
    if missing:
        return SolverEra("unknown", f"configs.yaml has no {', '.join(missing)}")
    lr = float(yaml_values["lr"])
    options = {key: float(yaml_values[key]) for key in _RULE_OPTIONS}
    moe_factor = options["moe_lr_factor"]
    moe_ratios = sorted({
        round(float(base) / lr, 6) for name, base in zip(names, base_lrs)
        if any(key in name for key in MOE_KEYS) and "bias" not in name
    })
    seen = f"MoE weight groups at {' / '.join(f'{ratio:g}' for ratio in moe_ratios) or 'no'} x lr"
    if moe_factor == 1:
        return SolverEra("unknown", f"{seen}: with moe_lr_factor 1 both solvers give them the base lr")
    if moe_ratios == [round(moe_factor, 6)]:
        era, rule = "v1", f"V1-era solver (moe_lr_factor {moe_factor:g})"
    elif moe_ratios == [1.0]:
        era, rule = "head", "HEAD/IRRA solver (no MoE lr group)"
    else:
        return SolverEra("unknown", f"{seen}: neither lr nor lr x moe_lr_factor ({moe_factor:g})")
    differ = sum(
        not math.isclose(float(base), param_group_rule(name, lr, solver=era, **options)[0], rel_tol=1e-6)
        for name, base in zip(names, base_lrs)
    )
    rest = f"all {len(names)} groups follow its rules" if not differ else \
        f"{differ} of {len(names)} groups differ from its rules"
    return SolverEra(era, f"{seen}: {rule}; {rest}")


# ----------------------------------------------------------------------------------------------
# The imported run's config


def plain(value: Any) -> Any:
    """A JSON-able copy of yaml data (tuples become lists)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def backbone_name(clip: ClipConfig) -> str | None:
    """The ``model.clip`` name whose dimensions ``clip`` has (the image size is separate), or None."""
    for name, named in CLIP_PRESETS.items():
        if replace(clip, image_size=named.image_size) == named:
            return name
    return None


def model_section(config: PHPConfig) -> dict:
    """The ``model`` section of a run config: PHPConfig fields plus the backbone name and image size."""
    name = backbone_name(config.clip)
    if name is None:
        raise InputError(f"checkpoint: backbone dimensions {config.clip} match neither {', '.join(CLIP_PRESETS)}")
    section = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("clip", "num_classes")}
    return {**section, "clip": name, "image_size": list(config.clip.image_size)}


def loss_section(yaml_values: dict) -> dict:
    """The ``loss`` section: the yaml's loss names, temperature and aux factor; ITC's x5 is fixed (spec 4)."""
    from php_runner.model.losses import LossConfig

    defaults = asdict(LossConfig())
    section = {**defaults, "names": str(yaml_values["loss_names"]).split("+")}
    for key in ("temperature", "aux_factor"):
        if key in yaml_values:
            section[key] = float(yaml_values[key])
    return plain(section)


# configs.yaml option -> TrainSettings field, where the names differ or the value needs converting
_TRAIN_FROM_YAML: dict[str, Callable[[dict], tuple[str, Any]]] = {
    "num_epoch": lambda y: ("epochs", int(y["num_epoch"])),
    "optimizer": lambda y: ("optimizer", str(y["optimizer"]).lower()),
    "val_dataset": lambda y: ("selection", "test" if y["val_dataset"] == "test" else "val"),
}
_TRAIN_SAME_NAME = ("batch_size", "lr", "momentum", "weight_decay", "weight_decay_bias", "bias_lr_factor", "lr_factor",
                    "transformer_lr_factor", "moe_lr_factor", "warmup_epochs", "warmup_factor", "img_aug",
                    "eval_period", "test_batch_size")


def train_section(yaml_values: dict, era: str) -> dict:
    """The ``train`` section: TrainSettings defaults overridden by every yaml value that has a field.

    ``solver`` is the era read from the checkpoint (``unknown`` where it could not be read).
    """
    from php_runner.engine.train import TrainSettings

    skipped = ("loss", "device", "num_workers", "compile", "pipeline")
    section = {f.name: getattr(TrainSettings(), f.name) for f in fields(TrainSettings) if f.name not in skipped}
    for key, convert in _TRAIN_FROM_YAML.items():
        if key in yaml_values:
            name, value = convert(yaml_values)
            section[name] = value
    for key in _TRAIN_SAME_NAME:
        if key in yaml_values:
            section[key] = type(section[key])(yaml_values[key])  # the field's type: yaml writes 5 for 5.0
    if "alpha" in yaml_values and "beta" in yaml_values:  # Adam's betas are the options alpha and beta
        section["betas"] = [float(yaml_values["alpha"]), float(yaml_values["beta"])]
    section.update(solver=era, precision="official")
    return plain(section)


@dataclass(frozen=True)
class EvaluationKey:
    """The evaluation settings that, with the checkpoint's sha256, identify an imported result."""

    batch_size: int
    encoder: str
    image_size: tuple[int, int]
    order: str = "annotation"
    precision: str = "official"


def imported_config(
    *,
    php_config: PHPConfig,
    yaml_values: dict,
    era: str,
    dataset: str,
    cell: Cell,
    sha256: str,
    evaluation: EvaluationKey,
    data_root: str | Path,
    data_source: str,
    device: str,
    num_workers: int,
) -> dict:
    """The resolved config of one imported cell (runtime is outside the hash, as for trained runs)."""
    return {
        "model": model_section(php_config),
        "loss": loss_section(yaml_values),
        "train": train_section(yaml_values, era),
        "data": {"dataset": dataset, "source": data_source, "val_from_train": 0.0, "val_seed": 0,
                 "pipeline": "pil"},  # the official code trained with the per-sample PIL loader
        "runtime": {"data_root": str(data_root), "clip_weights": None, "device": device, "num_workers": num_workers},
        "imported": {"sha256": sha256, "table": cell.table, "row": cell.row, "evaluation": plain(asdict(evaluation))},
    }


def validate_sections(config: dict, source: str | Path) -> None:
    """Check the sections with the spec models, so an imported run reads like a trained one.

    ``train`` is checked only when the solver era is known (``unknown`` is no trainable solver).
    """
    from pydantic import ValidationError

    from php_runner.experiment.schema import DataSection, LossSection, ModelSection, TrainSection

    models = {"model": ModelSection, "loss": LossSection, "data": DataSection}
    if config["train"]["solver"] in SOLVERS:
        models["train"] = TrainSection
    for section, model in models.items():
        try:
            model.model_validate(config[section])
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in (section, *first["loc"]))
            raise InputError(f"{source}: {where}: {first['msg']}") from None


# ----------------------------------------------------------------------------------------------
# Importing


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


def import_run(
    run: ReleasedRun, cells: Iterable[Cell], dataset: PedesDataset, registry: Registry, options: ImportOptions
) -> ImportOutcome:
    """Check, evaluate, audit and record one released run folder (bad files give a skipped outcome)."""
    from php_runner.model.checkpoint import extract_state_dict, load_checkpoint_file, read_official_yaml
    from php_runner.store.checksums import file_sha256

    cells = tuple(cells)
    outcome = ImportOutcome(run.label, "skipped", cells=cells, encoder=run.meaning.encoder)
    try:
        yaml_values = read_official_yaml(run.folder / YAML_NAME)
        for key in ("loss_names", "test_batch_size"):
            if key not in yaml_values:
                raise InputError(f"{run.folder / YAML_NAME}: no {key}")
        payload = load_checkpoint_file(run.folder / CHECKPOINT_NAME)
        state_dict = extract_state_dict(payload)
        inferred = infer_released_config(state_dict, yaml_values)
        outcome.sharing = inferred.sharing
        outcome.counter_buffers = any(is_counter_buffer(key) for key in state_dict)
        problems = disagreements(run.meaning, run.dataset, yaml_values, inferred)
        if problems:
            outcome.reason = "; ".join(problems)
            return outcome
        php_config = replace(inferred, variant=run.meaning.encoder, coupling="official")
    except InputError as err:
        outcome.reason = str(err)
        return outcome

    outcome.solver = solver_era(payload.get("scheduler"), parameter_names(state_dict), yaml_values)
    epoch = _epoch(payload)
    del payload  # the optimiser state is twice the size of the weights and is not needed any more
    outcome.sha256 = file_sha256(run.folder / CHECKPOINT_NAME)
    evaluation = EvaluationKey(
        batch_size=int(yaml_values["test_batch_size"]), encoder=run.meaning.encoder,
        image_size=tuple(php_config.clip.image_size),
    )
    try:
        configs = [
            imported_config(
                php_config=php_config, yaml_values=yaml_values, era=outcome.solver.era, dataset=run.dataset,
                cell=cell, sha256=outcome.sha256, evaluation=evaluation, data_root=options.data_root,
                data_source=options.data_source, device=options.device, num_workers=options.num_workers,
            )
            for cell in cells
        ]
        validate_sections(configs[0], run.folder / YAML_NAME)
    except InputError as err:
        outcome.reason = str(err)
        return outcome
    planned = [_planned_run(cell, config, run.dataset) for cell, config in zip(cells, configs)]
    records = [registry.plan_run(item, kind="imported") for item in planned]
    outcome.run_ids = tuple(record.id for record in records)

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
            outcome.metrics = registry.results(records[0].id)[RESULT_RULE]["metrics"]
            outcome.audit = _audit_summary(registry, records[0].id)
        return outcome

    try:
        model = _build_model(php_config, state_dict)
        settings = _eval_settings(evaluation, options)
        report = _run_audit(model, dataset, settings, yaml_values, epoch, options) if to_audit else None
        if claimed:
            metrics = report["ordered"] if report is not None else _evaluate(model, dataset, settings)
            provenance = _provenance(run, yaml_values, outcome, evaluation, options)
        for record in claimed:
            registry.record_result(record.id, RESULT_RULE, epoch, "test", metrics)
            registry.record_checkpoint(record.id, str(run.folder / CHECKPOINT_NAME), outcome.sha256, epoch,
                                       CHECKPOINT_ROLE)
            registry.record_provenance(record.id, provenance)
        for record in to_audit:
            registry.record_audit(record.id, report)
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
    done = ready[0].id
    outcome.metrics = registry.results(done)[RESULT_RULE]["metrics"]
    outcome.audit = _audit_summary(registry, done)
    return outcome


def _planned_run(cell: Cell, config: dict, dataset: str):
    from php_runner.experiment.schema import PlannedRun
    from php_runner.experiment.expand import config_hash

    return PlannedRun(
        config=config, config_hash=config_hash(config), spec_name=SPEC_NAME, table=cell.table,
        row_label=cell.row, dataset=dataset, seed=OFFICIAL_SEED, preset=PRESET,
    )


def _build_model(php_config: PHPConfig, state_dict: dict):
    from php_runner.model.checkpoint import load_state_dict_checked
    from php_runner.model.php import PHPModel
    from php_runner.model.precision import apply_precision

    import torch

    with torch.device("meta"):  # every tensor is written by the strict load below
        model = PHPModel(php_config)
    model = apply_precision(model.to_empty(device="cpu"), "official")
    load_state_dict_checked(model, state_dict)
    return model.eval()


def _eval_settings(evaluation: EvaluationKey, options: ImportOptions):
    from php_runner.engine.evaluate import EvalSettings

    return EvalSettings(
        batch_size=evaluation.batch_size, order=evaluation.order, encoder=evaluation.encoder, device=options.device,
        precision=evaluation.precision, num_workers=options.num_workers, image_size=evaluation.image_size,
    )


def _epoch(payload: dict) -> int:
    """The best epoch the official trainer stored; 0 where the file does not say."""
    epoch = payload.get("epoch")
    return epoch if isinstance(epoch, int) else 0


def _evaluate(model, dataset: PedesDataset, settings) -> dict:
    from php_runner.engine.evaluate import evaluate

    return evaluate(model, dataset.test, settings)


def _run_audit(
    model, dataset: PedesDataset, settings, yaml_values: dict, epoch: int, options: ImportOptions
) -> dict:
    from php_runner.engine.audit_measures import AuditSettings
    from php_runner.studies.audit import run_audit

    audit_settings = AuditSettings(eval=settings, train_batch_size=int(yaml_values.get("batch_size", 64)),
                                   seeds=options.audit_seeds)
    report = run_audit(model, dataset, audit_settings)
    # Only the selected epoch of a released run is known, so the other selection rules stay empty.
    report["selection"] = {
        "selected_by": "test" if yaml_values.get("val_dataset", "test") == "test" else "val",
        "epochs": None,
        "rules": {"best-on-test": {"epoch": epoch, "test": report["ordered"]}, "best-on-val": None,
                  "last": None},
        "r1_gaps": {"test_minus_val": None, "test_minus_last": None},
    }
    return report


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
