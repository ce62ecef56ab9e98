"""Experiment specs: TOML files, validated, inherited, expanded into runs.

The shipped specs and presets are package data (``php_runner/experiments/``), found by name from
an editable install, a wheel or any working directory (``shipped_folder``, ``find_spec``).

A spec file holds ``[model]``, ``[loss]``, ``[train]`` and ``[data]`` sections whose keys are the
fields of the resolved run config (docs/architecture.md, "Runner contract"), plus:

* ``extends = "NAME"``: start from ``NAME.toml`` in the same folder, else from the shipped spec
  ``NAME`` (deep merge, chains allowed); see ``parent_spec``;
* ``table``: the table of ``paper_results.toml`` the spec fills, ``row_label`` for a spec without
  a grid, ``datasets`` and ``seeds`` (defaults for the command line), ``description``;
* ``[grid]``: dotted paths (``"model.cnum" = [3, 6, 9, 12]``); the cartesian product of the lists
  gives the grid points, each labelled by its values (lists joined with "+"), which are the row
  keys of the paper table;
* ``[tune]``: an Optuna search space, objective, direction, trial budget and pruner.

``presets.toml`` beside the specs (else the shipped one) holds the presets (``paper``, ``tiny``): section overrides,
runtime defaults and the command-line options a preset requires. A run's config is built from, in
increasing priority: the spec chain, the preset, the grid point, then its dataset and seed. Its
``runtime`` part (preset defaults overridden by the command line) says where it runs and is left
out of the config hash. Every error is an ``InputError`` naming the file and the dotted field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from importlib import resources
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from php_runner.data.datasets import DATASET_NAMES, LAYOUTS
from php_runner.data.synthetic import VARIANTS as SYNTHETIC_VARIANTS
from php_runner.engine.optim import OPTIMIZERS, SOLVERS
from php_runner.engine.train import SELECTIONS
from php_runner.errors import InputError
from php_runner.model.config import COUPLINGS, SHARINGS, VARIANTS, ClipConfig, PHPConfig
from php_runner.model.losses import LOSS_NAMES
from php_runner.model.precision import PRECISIONS
from php_runner.experiment.paper import METRICS, first_problem, table_names

CLIP_NAMES = ("ViT-B/16", "tiny")
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


class _Strict(BaseModel):
    # allow_inf_nan=False: inf and nan are refused in every float field (the config hash is JSON).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---- the resolved run config ----------------------------------------------------------------------

class ModelSection(_Strict):
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


class LossSection(_Strict):
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


class TrainSection(_Strict):
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


class DataSection(_Strict):
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


class RuntimeSection(_Strict):
    """Where a run executes; not part of the config hash."""

    data_root: str = Field(min_length=1)
    clip_weights: str | None = None
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    num_workers: NonNegativeInt = 8
    compile: bool = False  # torch.compile the training forward: how fast a run goes, not what it computes


class RunConfig(_Strict):
    """A fully resolved run; ``model_dump()`` is the JSON-able config stored with each run."""

    model: ModelSection
    loss: LossSection
    train: TrainSection
    data: DataSection
    runtime: RuntimeSection


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "model": ModelSection, "loss": LossSection, "train": TrainSection, "data": DataSection,
}


# ---- the [tune] section ---------------------------------------------------------------------------

class FloatParam(_Strict):
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


class IntParam(_Strict):
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


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Union[bool, int, float, str]] = Field(min_length=1)


SearchParam = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class TuneSection(_Strict):
    """Optuna study settings; ``space`` keys are dotted config paths like grid keys."""

    objective: str = Field(default="val.R1", pattern=rf"^(val|test)\.({'|'.join(METRICS)})$")
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: PositiveInt
    pruner: Literal["median", "none"] = "median"
    space: dict[str, SearchParam] = Field(min_length=1)


# ---- spec files -----------------------------------------------------------------------------------

class _SpecFile(_Strict):
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


class Preset(_Strict):
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


@dataclass(frozen=True)
class _Layer:
    """One source of config values, for merging and for naming the culprit of an error."""

    origin: str       # file (or "command line")
    prefix: str       # how the values are addressed inside it, e.g. "grid." or "tiny."
    values: dict[str, Any]


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of everything but ``runtime``."""
    experiment = {key: value for key, value in config.items() if key != "runtime"}
    text = json.dumps(experiment, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_spec(path: str | Path) -> Spec:
    """Read a spec file and its ``extends`` chain; validate every grid point and the tune section."""
    path = Path(path)
    chain = _read_chain(path)
    files = [(file, _validate_top_level(file, raw)) for file, raw in chain]
    merged = _deep_merge(*(raw for _, raw in files))
    top = _SpecFile.model_validate(merged)
    origin = str(path)

    for dotted in top.grid:
        _check_path(dotted, _culprit(files, ("grid", dotted)), "grid.")
    if top.table is not None and top.table not in table_names():
        raise InputError(f"{_culprit(files, ('table',))}: table: unknown table {top.table!r}; "
                         f"known tables: {', '.join(table_names())}")
    tune = None
    if top.tune is not None:
        tune = _validate_model(TuneSection, [_Layer(str(file), "tune.", raw.get("tune", {})) for file, raw in files])
        for dotted in tune.space:
            _check_path(dotted, _culprit(files, ("tune", "space", dotted)), "tune.space.")

    spec_layers = [_Layer(str(file), "", {name: raw[name] for name in SECTIONS if name in raw}) for file, raw in files]
    for layer in spec_layers:
        for dotted in PER_RUN_FIELDS:
            if _contains(layer.values, tuple(dotted.split("."))):
                raise InputError(f"{layer.origin}: {dotted}: set per run; use the top-level "
                                 f"{'datasets' if dotted == 'data.dataset' else 'seeds'} list instead")

    spec = Spec(
        name=path.stem,
        path=path,
        chain=tuple(file for file, _ in files),
        description=top.description or "",
        table=top.table,
        datasets=tuple(top.datasets or DATASET_NAMES),
        seeds=tuple(top.seeds or DEFAULT_SEEDS),
        sections={name: dict(getattr(top, name)) for name in SECTIONS},
        points=_grid_points(top.grid, top.row_label or path.stem),
        tune=tune,
        audit=top.audit,
    )
    placeholder_runtime = _Layer("command line", "", {"runtime": {"data_root": "."}})
    for point in spec.points:
        _resolve(spec_layers, _grid_layer(origin, point), spec.datasets[0], spec.seeds[0], placeholder_runtime)
    return spec


def load_presets(folder: str | Path | None = None) -> dict[str, Preset]:
    """The presets of ``folder/presets.toml`` (default: the shipped ones), each checked for unknown fields."""
    path = Path(folder if folder is not None else shipped_folder()) / PRESETS_FILE
    raw = _read_toml(path)
    presets: dict[str, Preset] = {}
    for name, values in raw.items():
        if not isinstance(values, dict):
            raise InputError(f"{path}: {name}: a preset must be a table")
        presets[name] = _validate_model(Preset, [_Layer(str(path), f"{name}.", values)])
        for section in SECTIONS:
            for key in getattr(presets[name], section):
                _check_path(f"{section}.{key}", str(path), f"{name}.")
    if not presets:
        raise InputError(f"{path}: no presets defined")
    return presets


def load_all_specs(folder: str | Path | None = None) -> dict[str, Spec]:
    """Every spec of ``folder`` (default: the shipped ones) by name; each grid point is also checked
    under every preset."""
    folder = Path(folder if folder is not None else shipped_folder())
    if not folder.is_dir():
        raise InputError(f"{folder}: spec folder not found")
    presets = load_presets(folder)
    specs = {path.stem: load_spec(path) for path in sorted(folder.glob("*.toml")) if path.name != PRESETS_FILE}
    if not specs:
        raise InputError(f"{folder}: no spec files (*.toml)")
    for spec in specs.values():
        for preset_name, preset in presets.items():
            runtime = {"data_root": ".", **{option: "." for option in preset.requires}}
            _plan(spec, preset_name, preset, spec.datasets[:1], spec.seeds[:1], runtime)
    return specs


# ---- shipped specs and lookup by name ------------------------------------------------------------

def shipped_folder() -> Path:
    """The specs and presets shipped inside the package, wherever and however it is installed."""
    return Path(str(resources.files("php_runner") / "experiments"))


def shipped_spec_names() -> list[str]:
    """The names of the shipped specs (presets.toml is not a spec), sorted."""
    return sorted(path.stem for path in shipped_folder().glob("*.toml") if path.name != PRESETS_FILE)


def find_spec(name_or_path: str | Path) -> Path:
    """A spec file given as a path, or the shipped spec of that name (``cnum`` -> .../experiments/cnum.toml).

    An existing file always wins, so a user's ``./cnum.toml`` is run when asked for by path.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    if name in shipped_spec_names():
        return shipped_folder() / f"{name}.toml"
    raise InputError(f"{name}: no such spec file and no shipped spec of that name; "
                     f"shipped specs: {', '.join(shipped_spec_names())}")


def parent_spec(child: Path, name: str) -> Path | None:
    """The file ``extends = name`` in ``child`` refers to: the sibling ``name.toml``, else the shipped spec.

    The sibling wins so that a folder holding its own edited copy of ``base.toml`` keeps using it
    (what the user sees beside their file is what they get); the shipped fallback lets a lone spec
    file anywhere extend the paper recipe by name. None when neither exists.
    """
    sibling = child.parent / f"{name}.toml"
    if sibling.is_file():
        return sibling
    shipped = shipped_folder() / f"{name}.toml"
    return shipped if name != Path(PRESETS_FILE).stem and shipped.is_file() else None


def presets_folder(spec_folder: Path) -> Path:
    """Where a spec's presets come from: its own folder when it holds presets.toml, else the shipped folder."""
    return spec_folder if (spec_folder / PRESETS_FILE).is_file() else shipped_folder()


def expand(spec: Spec, preset: str, datasets: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
           runtime: Mapping[str, Any] | None = None) -> list[PlannedRun]:
    """The runs of ``spec`` under ``preset``: dataset x grid point x seed, in that nesting order.

    ``datasets``/``seeds`` default to the spec's own lists. ``runtime`` holds the command-line values
    (``data_root``, ``clip_weights``, ``device``, ``num_workers``); None entries fall back to the
    preset's runtime defaults.
    """
    presets = load_presets(presets_folder(spec.folder))
    if preset not in presets:
        raise InputError(f"--preset: unknown preset {preset!r}; known presets: {', '.join(presets)}")
    for dataset in datasets or ():
        if dataset not in DATASET_NAMES:
            raise InputError(f"--dataset: unknown dataset {dataset!r}; expected one of {', '.join(DATASET_NAMES)}")
    chosen = presets[preset]
    given = {key: value for key, value in (runtime or {}).items() if value is not None}
    values = {**chosen.runtime, **given}
    for option in chosen.requires:
        if not values.get(option):
            raise InputError(f"--{option.replace('_', '-')}: required by preset {preset!r}")
    return _plan(spec, preset, chosen, _unique(datasets or spec.datasets), _unique(seeds or spec.seeds), values)


def override(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A copy of a resolved config with dotted-path ``values`` set (e.g. a tuning trial), re-validated."""
    for dotted in values:
        _check_path(dotted, "override", "")
    layers = [_Layer("resolved config", "", dict(config)), _Layer("override", "", _nest(values))]
    return _validate_model(RunConfig, layers).model_dump(mode="json")


# ---- internals ------------------------------------------------------------------------------------

def _plan(spec: Spec, preset_name: str, preset: Preset, datasets: Iterable[str], seeds: Iterable[int],
          runtime: Mapping[str, Any]) -> list[PlannedRun]:
    presets_path = str(presets_folder(spec.folder) / PRESETS_FILE)
    layers = [_Layer(str(spec.path), "", spec.sections),
              _Layer(presets_path, f"{preset_name}.", {name: getattr(preset, name) for name in SECTIONS})]
    runtime_layer = _Layer("command line", "", {"runtime": dict(runtime)})
    seeds = list(seeds)
    runs = []
    for dataset in datasets:
        for point in spec.points:
            for seed in seeds:
                config = _resolve(layers, _grid_layer(str(spec.path), point), dataset, seed, runtime_layer)
                runs.append(PlannedRun(config=config, config_hash=config_hash(config), spec_name=spec.name,
                                       table=spec.table, row_label=point.label, dataset=dataset, seed=seed,
                                       preset=preset_name))
    return runs


def _resolve(layers: list[_Layer], grid: _Layer, dataset: str, seed: int, runtime: _Layer) -> dict:
    per_run = _Layer("command line", "", {"data": {"dataset": dataset}, "train": {"seed": seed}})
    return _validate_model(RunConfig, [*layers, grid, per_run, runtime]).model_dump(mode="json")


def _grid_layer(origin: str, point: GridPoint) -> _Layer:
    return _Layer(origin, "grid.", _nest(point.values))


def _grid_points(grid: Mapping[str, list[Any]], single_label: str) -> tuple[GridPoint, ...]:
    if not grid:
        return (GridPoint(label=single_label, values={}),)
    keys = list(grid)
    points = []
    for combination in itertools.product(*(grid[key] for key in keys)):
        label = ", ".join(_label(value) for value in combination)
        points.append(GridPoint(label=label, values=dict(zip(keys, combination))))
    return tuple(points)


def _label(value: Any) -> str:
    """Row label of one grid value: lists joined with "+", booleans lower-case, numbers as written."""
    if isinstance(value, list):
        return "+".join(_label(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_path(dotted: str, origin: str, prefix: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise InputError(f"{origin}: {prefix}{dotted}: expected SECTION.FIELD with SECTION one of {', '.join(SECTIONS)}")
    section, field = parts
    if field not in _SECTION_MODELS[section].model_fields:
        raise InputError(f"{origin}: {prefix}{dotted}: unknown field {field!r} of [{section}]")
    if dotted in PER_RUN_FIELDS:
        raise InputError(f"{origin}: {prefix}{dotted}: set per run from the datasets/seeds lists")


def _validate_model(model: type[BaseModel], layers: list[_Layer]) -> Any:
    try:
        return model.model_validate(_deep_merge(*(layer.values for layer in layers)))
    except ValidationError as err:
        layer = _layer_of(layers, tuple(err.errors()[0]["loc"]))
        field, message = first_problem(err)
        where = f"{layer.prefix}{field}" if field else layer.prefix.rstrip(".")
        raise InputError(f"{layer.origin}: {where}: {message}" if where else f"{layer.origin}: {message}") from None


def _layer_of(layers: list[_Layer], loc: tuple) -> _Layer:
    """The last layer that sets the failing path (or its nearest enclosing table).

    A path no layer sets (a required section missing) is blamed on the first layer: the root of
    the spec chain, which must define every section (or extend a spec that does).
    """
    for depth in range(len(loc), 0, -1):
        for layer in reversed(layers):
            if _contains(layer.values, loc[:depth]):
                return layer
    return layers[0]


def _culprit(files: list[tuple[Path, dict]], loc: tuple) -> str:
    return str(_layer_of([_Layer(str(file), "", raw) for file, raw in files], loc).origin)


def _contains(values: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(values, dict) and part in values:
            values = values[part]
        elif isinstance(values, list) and isinstance(part, int) and 0 <= part < len(values):
            values = values[part]
        else:
            return False
    return True


def _deep_merge(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key, later sources win; anything else (lists included) is replaced."""
    merged: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                merged[key] = _deep_merge(merged[key], value)
            elif isinstance(value, Mapping):
                merged[key] = _deep_merge(value)
            else:
                merged[key] = value
    return merged


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        section, field = dotted.split(".")
        nested.setdefault(section, {})[field] = value
    return nested


def _read_chain(path: Path) -> list[tuple[Path, dict]]:
    """The ``extends`` chain of ``path``, root ancestor first; cycles and missing parents rejected."""
    chain: list[tuple[Path, dict]] = []
    current = path
    while True:
        if any(current.resolve() == seen.resolve() for seen, _ in chain):
            names = " -> ".join([file.stem for file, _ in chain] + [current.stem])
            raise InputError(f"{path}: extends: cycle {names}")
        raw = _read_toml(current)
        chain.append((current, raw))
        parent = raw.get("extends")
        if parent is None:
            break
        if not isinstance(parent, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", parent):
            raise InputError(f"{current}: extends: expected the name of a spec, got {parent!r}")
        found = parent_spec(current, parent)
        if found is None:
            raise InputError(f"{current}: extends: no spec {parent!r} ({current.parent / f'{parent}.toml'} not "
                             f"found, and no shipped spec of that name)")
        current = found
    return chain[::-1]


def _validate_top_level(path: Path, raw: dict) -> dict:
    _validate_model(_SpecFile, [_Layer(str(path), "", raw)])
    return raw


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))
