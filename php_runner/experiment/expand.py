"""Expansion of a spec into runs, and the config hash.

A run's config is built from, in increasing priority: the recipe (the root of the spec chain), the
preset, the files extending the recipe (the user's own values), the grid point, the command line's
overrides, then its dataset and seed; its ``runtime`` part is left out of the config hash (``config_hash``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from php_runner.errors import InputError
from php_runner.experiment.layers import Layer, nest, validate_layers
from php_runner.experiment.schema import (
    SECTIONS,
    GridPoint,
    PlannedRun,
    Preset,
    RunConfig,
    Spec,
    check_path,
)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of everything but ``runtime``."""
    experiment = {key: value for key, value in config.items() if key != "runtime"}
    text = json.dumps(experiment, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def override(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A copy of a resolved config with dotted-path ``values`` set (e.g. a tuning trial), re-validated."""
    for dotted in values:
        check_path(dotted, "override", "")
    layers = [Layer("resolved config", "", dict(config)), Layer("override", "", nest(values))]
    return validate_layers(RunConfig, layers).model_dump(mode="json")


MAX_RUNS_DEFAULT = 1000
MAX_RUNS_ENV = "PHP_RUN_MAX_RUNS"


def max_runs() -> int:
    """The most runs one spec may expand to: ``$PHP_RUN_MAX_RUNS`` when set, else ``MAX_RUNS_DEFAULT``."""
    text = os.environ.get(MAX_RUNS_ENV, "").strip()
    if not text:
        return MAX_RUNS_DEFAULT
    if not (text.isascii() and text.isdecimal()) or int(text) < 1:
        raise InputError(f"${MAX_RUNS_ENV}: expected a positive integer, got {text!r}")
    return int(text)


def check_run_count(grid_sizes: Iterable[int], datasets: int, seeds: int, origin: str) -> None:
    """Refuse a spec whose grid x datasets x seeds exceeds ``max_runs()``, counted before anything is expanded."""
    sizes = list(grid_sizes)
    count = math.prod(sizes) * datasets * seeds
    limit = max_runs()
    if count > limit:
        grid = " x ".join(str(size) for size in sizes) or "1"
        raise InputError(f"{origin}: expands to {count:,} runs (grid {grid} x {datasets} dataset(s) x {seeds} "
                         f"seed(s)), over the limit of {limit:,} runs; set ${MAX_RUNS_ENV} to allow more")


def plan_runs(spec: Spec, preset_name: str, preset: Preset, datasets: Iterable[str], seeds: Iterable[int],
              runtime: Mapping[str, Any], presets_path: str) -> list[PlannedRun]:
    """The runs of ``spec`` under ``preset`` (read from ``presets_path``): dataset x grid point x
    override point x seed."""
    layers = value_layers(spec, preset_name, preset, presets_path)
    seeds, datasets = list(seeds), list(datasets)
    check_run_count([len(spec.points), *(len(values) for values in spec.overrides.values())], len(datasets),
                    len(seeds), str(spec.path))
    runs = []
    for dataset in datasets:
        for point in spec.points:
            for chosen in override_points(spec.overrides):
                label = " ".join(filter(None, (point_label(point, chosen), f"[{override_label(chosen)}]" if chosen else "")))
                runtime_layer = Layer("command line", "", {"runtime": {**runtime, **({"overrides": chosen} if chosen else {})}})
                for seed in seeds:
                    config = resolve_config([*layers, grid_layer(str(spec.path), point)], override_layer(chosen),
                                            dataset, seed, runtime_layer)
                    runs.append(PlannedRun(config=config, config_hash=config_hash(config), spec_name=spec.name,
                                           table=spec.table, row_label=label, dataset=dataset, seed=seed,
                                           preset=preset_name))
    if spec.overrides:  # an override of a grid key makes that grid's points one config
        first = {}
        for run in runs:
            first.setdefault(run.config_hash, run)
        runs = list(first.values())
    return runs


def value_layers(spec: Spec, preset_name: str, preset: Preset, presets_path: str) -> list[Layer]:
    """The section layers of a run, lowest priority first: the recipe (the chain's root file), the
    preset, then each file that extends the recipe (the user's own values: a preset never replaces them)."""
    preset_layer = Layer(presets_path, f"{preset_name}.", {name: getattr(preset, name) for name in SECTIONS})
    files = spec.file_sections or ((str(spec.path), spec.sections),)
    recipe, *own = [Layer(origin, "", dict(sections)) for origin, sections in files]
    return [recipe, preset_layer, *own]


def preset_conflicts(spec: Spec, preset_name: str, preset: Preset) -> list[str]:
    """One note per value the user set (in a file extending the recipe, or on the command line) that
    ``preset`` would have changed: the user's value is kept."""
    notes = []
    own = [(origin, sections) for origin, sections in spec.file_sections[1:]]
    own += [("command line", nest({key: values[0] for key, values in spec.overrides.items() if len(values) == 1}))]
    for origin, sections in own:
        for section in SECTIONS:
            scaled = getattr(preset, section)
            for key, value in sections.get(section, {}).items():
                if key in scaled and scaled[key] != value:
                    notes.append(f"{origin}: {section}.{key} = {value!r} kept; preset {preset_name!r} would set "
                                 f"{scaled[key]!r}")
    return notes


def override_points(overrides: Mapping[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every combination of the command line's override values ([{}] without overrides)."""
    keys = list(overrides)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(overrides[key] for key in keys))]


def override_label(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={row_label_of(value)}" for key, value in values.items())


def override_layer(values: Mapping[str, Any]) -> Layer:
    return Layer("command line", "", nest(values))


def resolve_config(layers: list[Layer], grid: Layer, dataset: str, seed: int, runtime: Layer) -> dict:
    """``layers`` (the last may be a grid point), then ``grid`` (or the command line's overrides), the
    dataset and seed, and the runtime; later layers win."""
    per_run = Layer("command line", "", {"data": {"dataset": dataset}, "train": {"seed": seed}})
    config = validate_layers(RunConfig, [*layers, grid, per_run, runtime]).model_dump(mode="json")
    if not config["runtime"]["overrides"]:  # the stored config names overrides only when there are some
        del config["runtime"]["overrides"]
    return config


def grid_layer(origin: str, point: GridPoint) -> Layer:
    return Layer(origin, "grid.", nest(point.values))


def grid_points(grid: Mapping[str, list[Any]], single_label: str) -> tuple[GridPoint, ...]:
    if not grid:
        return (GridPoint(label=single_label, values={}),)
    keys = list(grid)
    points = []
    for combination in itertools.product(*(grid[key] for key in keys)):
        label = ", ".join(row_label_of(value) for value in combination)
        points.append(GridPoint(label=label, values=dict(zip(keys, combination))))
    return tuple(points)


def point_label(point: GridPoint, overridden: Mapping[str, Any]) -> str:
    """A grid point's row label without the grid keys the command line overrides: those points collapse
    into one config, which the override's own label names."""
    if not any(key in overridden for key in point.values):
        return point.label
    return ", ".join(row_label_of(value) for key, value in point.values.items() if key not in overridden)


def row_label_of(value: Any) -> str:
    """Row label of one grid value: lists joined with "+", booleans lower-case, numbers as written."""
    if isinstance(value, list):
        return "+".join(row_label_of(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))
