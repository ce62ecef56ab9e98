"""The registry config of an imported released checkpoint.

An imported run's config has the sections of a trained run's config (model inferred from the
checkpoint's keys, loss and train from the yaml) plus an ``imported`` section holding the
checkpoint's sha256, the cell and the evaluation settings. All of them are in the config hash, so
re-importing the same checkpoint with the same settings finds the recorded run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from php_runner.engine.optim import SOLVERS
from php_runner.errors import InputError
from php_runner.model.config import CLIP_PRESETS, ClipConfig, PHPConfig
from php_runner.studies.released import Cell

SPEC_NAME = "released"  # the spec_name of imported runs: they come from no spec file
PRESET = "released"
OFFICIAL_SEED = 1  # set_seed(1 + rank) in the official training (spec 10)


def official_selection(yaml_values: dict) -> str:
    """The split the official training selected best.pth on: its ``val_dataset`` (test unless it says val)."""
    return "test" if yaml_values.get("val_dataset", "test") == "test" else "val"


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
    "val_dataset": lambda y: ("selection", official_selection(y)),
}
_TRAIN_SAME_NAME = ("batch_size", "lr", "momentum", "weight_decay", "weight_decay_bias", "bias_lr_factor", "lr_factor",
                    "transformer_lr_factor", "moe_lr_factor", "warmup_epochs", "warmup_factor", "img_aug",
                    "eval_period", "test_batch_size")


def train_section(yaml_values: dict, era: str) -> dict:
    """The ``train`` section: TrainSettings defaults overridden by every yaml value that has a field.

    ``solver`` is the era read from the checkpoint (``unknown`` where it could not be read).
    """
    from php_runner.engine.train import RUNTIME_FIELDS, TrainSettings

    skipped = ("loss", "pipeline", *RUNTIME_FIELDS)
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

    from php_runner.experiment.schema import (
        DataSection,
        LossSection,
        ModelSection,
        TrainSection,
    )

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


def planned_run(cell: Cell, config: dict, dataset: str):
    """The registry's planned run of one imported cell."""
    from php_runner.experiment.expand import config_hash
    from php_runner.experiment.schema import PlannedRun

    return PlannedRun(
        config=config, config_hash=config_hash(config), spec_name=SPEC_NAME, table=cell.table,
        row_label=cell.row, dataset=dataset, seed=OFFICIAL_SEED, preset=PRESET,
    )


def php_run_import(identity: dict, runtime: dict, evaluation: EvaluationKey) -> tuple[dict, EvaluationKey]:
    """A php-run folder imports as the run it was: its own config (so its config hash; ``runtime`` from the
    import options) and the in-training evaluation that selected its best.pth (batch, precision)."""
    own, train = identity["config"], identity["config"]["train"]
    return ({**own, "runtime": runtime},
            replace(evaluation, batch_size=int(train["batch_size"]), precision=str(train["precision"])))
