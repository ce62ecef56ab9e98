"""Expansion of a spec into runs, and the config hash.

A run's config is built from, in increasing priority: the spec chain, the preset, the grid point,
then its dataset and seed; its ``runtime`` part is left out of the config hash (``config_hash``).
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
    """The runs of ``spec`` under ``preset`` (read from ``presets_path``): dataset x grid point x seed."""
    layers = [Layer(str(spec.path), "", spec.sections),
              Layer(presets_path, f"{preset_name}.", {name: getattr(preset, name) for name in SECTIONS})]
    runtime_layer = Layer("command line", "", {"runtime": dict(runtime)})
    seeds, datasets = list(seeds), list(datasets)
    check_run_count([len(spec.points)], len(datasets), len(seeds), str(spec.path))
    runs = []
    for dataset in datasets:
        for point in spec.points:
            for seed in seeds:
                config = resolve_config(layers, grid_layer(str(spec.path), point), dataset, seed, runtime_layer)
                runs.append(PlannedRun(config=config, config_hash=config_hash(config), spec_name=spec.name,
                                       table=spec.table, row_label=point.label, dataset=dataset, seed=seed,
                                       preset=preset_name))
    return runs


def resolve_config(layers: list[Layer], grid: Layer, dataset: str, seed: int, runtime: Layer) -> dict:
    per_run = Layer("command line", "", {"data": {"dataset": dataset}, "train": {"seed": seed}})
    return validate_layers(RunConfig, [*layers, grid, per_run, runtime]).model_dump(mode="json")


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


def row_label_of(value: Any) -> str:
    """Row label of one grid value: lists joined with "+", booleans lower-case, numbers as written."""
    if isinstance(value, list):
        return "+".join(row_label_of(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))
