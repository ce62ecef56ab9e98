"""The schema of specs and run configs: the sections of a resolved run config, the tune section,
the top level of a spec file and presets (pydantic, strict), and the loaded ``Spec`` and ``PlannedRun``.
"""

from __future__ import annotations

import difflib

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationInfo,
    field_validator,
    model_validator,
)

from php_runner.data.datasets import DATASET_NAMES, LAYOUTS
from php_runner.data.synthetic import VARIANTS as SYNTHETIC_VARIANTS
from php_runner.engine.metrics import METRIC_NAMES
from php_runner.engine.optim import OPTIMIZERS, SOLVERS
from php_runner.engine.train import SELECTIONS
from php_runner.errors import InputError
from php_runner.model.config import CLIP_PRESETS, COUPLINGS, SHARINGS, VARIANTS, ClipConfig, PHPConfig
from php_runner.model.losses import LOSS_NAMES
from php_runner.model.precision import GRAPHABLE_PRECISIONS, PRECISIONS

CLIP_NAMES = tuple(CLIP_PRESETS)
# "synthetic" is the default synthetic set; "synthetic-NAME" a named variant of data/synthetic.py.
DATA_SOURCES = ("real", "synthetic", *(f"synthetic-{name}" for name in SYNTHETIC_VARIANTS))
DATA_PIPELINES = ("cache", "pil")  # decoded-image cache + batch augmentation on the device, or per-sample PIL
SECTIONS = ("model", "loss", "train", "data")
PRESETS_FILE = "presets.toml"
DEFAULT_SEEDS = (1,)  # the official code seeds with 1 + rank
# Set per run from the spec's datasets/seeds (or the command line), never inside a section.
PER_RUN_FIELDS = ("data.dataset", "train.seed")
RUNTIME_OPTIONS = ("data_root", "clip_weights")
# Every integer of a config becomes a tensor dimension, a loop count or a registry column: 32 bits
# bound them all. Seeds follow numpy's seed range.
MAX_INT = 2**31 - 1
MAX_SEED = 2**32 - 1
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
PositiveInt = Annotated[int, Field(gt=0, le=MAX_INT)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_INT)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    # allow_inf_nan=False: inf and nan are refused in every float field (the config hash is JSON).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSection(Strict):
    """``PHPConfig`` fields except ``clip``/``num_classes``, plus the CLIP name and the image size."""

    clip: Literal[CLIP_NAMES]
    image_size: list[PositiveInt] = Field(min_length=2, max_length=2)
    cnum: PositiveInt
    num_experts: PositiveInt
    topk: PositiveInt
    reduction: PositiveInt
    efp_layers: PositiveInt
    efp_heads: PositiveInt
    variant: Literal[VARIANTS]
    sharing: Literal[SHARINGS]
    coupling: Literal[COUPLINGS]

    @model_validator(mode="after")
    def _buildable(self) -> "ModelSection":
        clip = ClipConfig() if self.clip == "ViT-B/16" else PHPConfig.tiny().clip
        clip = replace(clip, image_size=tuple(self.image_size))
        if min(self.image_size) < clip.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than the {self.clip} patch ({clip.patch_size})")
        fields = self.model_dump(exclude={"clip", "image_size"})
        PHPConfig(clip=clip, **fields)  # its own checks (top-k, heads) raise ValueError
        return self


class LossSection(Strict):
    """``LossConfig`` fields."""

    names: list[Literal[LOSS_NAMES]] = Field(min_length=1)
    temperature: PositiveFloat
    itc_weight: NonNegativeFloat
    aux_factor: NonNegativeFloat

    @model_validator(mode="after")
    def _distinct(self) -> "LossSection":
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names repeat a loss: {'+'.join(self.names)}")
        return self


class TrainSection(Strict):
    """``TrainSettings`` fields except ``loss``, ``device`` and ``num_workers``."""

    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    optimizer: Literal[OPTIMIZERS]
    adam_eps: PositiveFloat
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(min_length=2, max_length=2)
    momentum: NonNegativeFloat
    weight_decay: NonNegativeFloat
    weight_decay_bias: NonNegativeFloat
    bias_lr_factor: PositiveFloat
    lr_factor: PositiveFloat
    solver: Literal[SOLVERS]
    transformer_lr_factor: PositiveFloat
    moe_lr_factor: PositiveFloat
    warmup_epochs: NonNegativeInt
    warmup_factor: Annotated[float, Field(gt=0, le=1)]
    img_aug: bool
    precision: Literal[PRECISIONS]
    selection: Literal[SELECTIONS]
    evaluate_test: bool
    eval_period: PositiveInt
    test_batch_size: PositiveInt
    seed: Seed
    deterministic: bool


class DataSection(Strict):
    dataset: Literal[DATASET_NAMES]
    source: Literal[DATA_SOURCES]
    val_from_train: Annotated[float, Field(ge=0, lt=1)]
    val_seed: Seed
    # Part of the hash: the two pipelines draw their augmentation from different random streams.
    pipeline: Literal[DATA_PIPELINES] = "cache"

    @field_validator("val_from_train")
    @classmethod
    def _only_without_val_split(cls, value: float, info: ValidationInfo) -> float:
        dataset = info.data.get("dataset")
        if value and dataset in LAYOUTS and LAYOUTS[dataset].has_val:
            raise ValueError(f"{dataset} has a val split of its own; hold out training identities only where "
                             f"there is none (ICFG-PEDES)")
        return value


class RuntimeSection(Strict):
    """Where a run executes; not part of the config hash."""

    data_root: str = Field(min_length=1)
    clip_weights: str | None = None
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    num_workers: NonNegativeInt = 8
    compile: bool = False  # torch.compile the training forward: how fast a run goes, not what it computes
    # Forward + losses as one compiled region replayed as CUDA graphs (fast regime only; see engine/step.py).
    cuda_graphs: bool = False
    # Iterations between the per-iteration records (train_log.txt lines, TensorBoard points); official: 100.
    log_period: PositiveInt = 100
    # The command line's key=value overrides of this run (dotted name -> value), for provenance: the
    # values themselves are in the sections (and the hash) already.
    overrides: dict[str, Any] = Field(default_factory=dict)


class RunConfig(Strict):
    """A fully resolved run; ``model_dump()`` is the JSON-able config stored with each run."""

    model: ModelSection
    loss: LossSection
    train: TrainSection
    data: DataSection
    runtime: RuntimeSection

    @field_validator("runtime")
    @classmethod
    def _graphs_only_in_the_fast_regime(cls, runtime: RuntimeSection, info: ValidationInfo) -> RuntimeSection:
        train = info.data.get("train")
        if runtime.cuda_graphs and train is not None and train.precision not in GRAPHABLE_PRECISIONS:
            raise ValueError(f"cuda_graphs = true needs train.precision = 'amp' (the fast regime), "
                             f"got {train.precision!r}")
        return runtime


SECTION_MODELS: dict[str, type[BaseModel]] = {
    "model": ModelSection, "loss": LossSection, "train": TrainSection, "data": DataSection,
}


class FloatParam(Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: PositiveFloat | None = None

    @model_validator(mode="after")
    def _range(self) -> "FloatParam":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self


class IntParam(Strict):
    type: Literal["int"]
    low: int
    high: int
    step: PositiveInt = 1
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "IntParam":
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("a log-scale integer range needs low >= 1 and step 1")
        return self


class CategoricalParam(Strict):
    type: Literal["categorical"]
    choices: list[Union[bool, int, float, str]] = Field(min_length=1)


SearchParam = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class TuneSection(Strict):
    """Optuna study settings; ``space`` keys are dotted config paths like grid keys."""

    objective: str = Field(default="val.R1", pattern=rf"^(val|test)\.({'|'.join(METRIC_NAMES)})$")
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: PositiveInt
    pruner: Literal["median", "none"] = "median"
    space: dict[str, SearchParam] = Field(min_length=1)


class SpecFile(Strict):
    """The top level of one spec file; sections are checked after the ``extends`` chain is merged."""

    extends: str | None = None
    description: str | None = None
    table: str | None = None
    row_label: str | None = None
    datasets: list[Literal[DATASET_NAMES]] | None = Field(default=None, min_length=1)
    seeds: list[Seed] | None = Field(default=None, min_length=1)
    model: dict[str, Any] = Field(default_factory=dict)
    loss: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    tune: dict[str, Any] | None = None
    audit: bool = False


class Preset(Strict):
    """A named scale: section overrides, runtime defaults, and the options it requires."""

    description: str
    requires: list[Literal[RUNTIME_OPTIONS]] = Field(default_factory=list)
    model: dict[str, Any] = Field(default_factory=dict)
    loss: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    runtime: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class GridPoint:
    """One point of a spec's grid: its row label and the dotted-path values it sets."""

    label: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Spec:
    """A loaded, validated spec (its ``extends`` chain merged)."""

    name: str
    path: Path
    chain: tuple[Path, ...]            # root ancestor first, this file last
    description: str
    table: str | None
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    sections: dict[str, dict[str, Any]]  # merged model/loss/train/data
    points: tuple[GridPoint, ...]
    tune: TuneSection | None
    audit: bool = False                # audit every run after training (the table's verdict column reads it)
    # Section values per file of the chain, root first: the root (the file without ``extends``, the
    # shipped base.toml for every shipped spec) is the recipe a preset scales; the files that extend it
    # hold the user's own values, which a preset never replaces.
    file_sections: tuple[tuple[str, dict[str, dict[str, Any]]], ...] = ()
    # Command-line overrides: dotted name -> the values to sweep (one run per combination, like [grid]).
    overrides: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class PlannedRun:
    config: dict
    config_hash: str
    spec_name: str
    table: str | None
    row_label: str
    dataset: str
    seed: int
    preset: str


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'lr'?"`` for the closest of ``choices`` (difflib), else empty."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_path(dotted: str, origin: str, prefix: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        known = [f"{section}.{name}" for section in SECTIONS for name in SECTION_MODELS[section].model_fields]
        raise InputError(f"{origin}: {prefix}{dotted}: expected SECTION.FIELD with SECTION one of "
                         f"{', '.join(SECTIONS)}{did_you_mean(dotted, known)}")
    section, name = parts
    if name not in SECTION_MODELS[section].model_fields:
        raise InputError(f"{origin}: {prefix}{dotted}: unknown field {name!r} of [{section}]"
                         f"{did_you_mean(name, SECTION_MODELS[section].model_fields)}")
    if dotted in PER_RUN_FIELDS:
        raise InputError(f"{origin}: {prefix}{dotted}: set per run from the datasets/seeds lists")
