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
increasing priority: the recipe (the chain's root file, base.toml for the shipped specs), the preset,
the files extending the recipe (values the user wrote: a preset never replaces them; ``preset_notes``
names each one a preset would have changed), the grid point, the command line's ``key=value``
overrides (``with_overrides``), then its dataset and seed. Its
``runtime`` part (preset defaults overridden by the command line) says where it runs and is left
out of the config hash. Every error is an ``InputError`` naming the file and the dotted field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from php_runner.data.datasets import DATASET_NAMES
from php_runner.errors import InputError
from php_runner.experiment.expand import (
    check_run_count,
    grid_layer,
    grid_points,
    plan_runs,
    preset_conflicts,
    resolve_config,
    unique,
)
from php_runner.experiment.layers import (
    Layer,
    contains,
    culprit,
    deep_merge,
    validate_layers,
)
from php_runner.experiment.paper import table_names
from php_runner.experiment.schema import (
    DEFAULT_SEEDS,
    PER_RUN_FIELDS,
    PRESETS_FILE,
    SECTIONS,
    PlannedRun,
    Preset,
    Spec,
    SpecFile,
    TuneSection,
    check_path,
)


def load_spec(path: str | Path) -> Spec:
    """Read a spec file and its ``extends`` chain; validate every grid point and the tune section."""
    path = Path(path)
    chain = _read_chain(path)
    files = [(file, _validate_top_level(file, raw)) for file, raw in chain]
    merged = deep_merge(*(raw for _, raw in files))
    top = SpecFile.model_validate(merged)
    origin = str(path)
    check_run_count((len(values) for values in top.grid.values()), len(top.datasets or DATASET_NAMES),
                    len(top.seeds or DEFAULT_SEEDS), origin)

    for dotted in top.grid:
        check_path(dotted, culprit(files, ("grid", dotted)), "grid.")
    if top.table is not None and top.table not in table_names():
        raise InputError(f"{culprit(files, ('table',))}: table: unknown table {top.table!r}; "
                         f"known tables: {', '.join(table_names())}")
    tune = None
    if top.tune is not None:
        tune = validate_layers(TuneSection, [Layer(str(file), "tune.", raw.get("tune", {})) for file, raw in files])
        for dotted in tune.space:
            check_path(dotted, culprit(files, ("tune", "space", dotted)), "tune.space.")

    spec_layers = [Layer(str(file), "", {name: raw[name] for name in SECTIONS if name in raw}) for file, raw in files]
    for layer in spec_layers:
        for dotted in PER_RUN_FIELDS:
            if contains(layer.values, tuple(dotted.split("."))):
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
        points=grid_points(top.grid, top.row_label or path.stem),
        tune=tune,
        audit=top.audit,
        file_sections=tuple((layer.origin, layer.values) for layer in spec_layers),
    )
    placeholder_runtime = Layer("command line", "", {"runtime": {"data_root": "."}})
    for point in spec.points:
        resolve_config(spec_layers, grid_layer(origin, point), spec.datasets[0], spec.seeds[0], placeholder_runtime)
    return spec


def load_presets(folder: str | Path | None = None) -> dict[str, Preset]:
    """The presets of ``folder/presets.toml`` (default: the shipped ones), each checked for unknown fields."""
    path = Path(folder if folder is not None else shipped_folder()) / PRESETS_FILE
    raw = _read_toml(path)
    presets: dict[str, Preset] = {}
    for name, values in raw.items():
        if not isinstance(values, dict):
            raise InputError(f"{path}: {name}: a preset must be a table")
        presets[name] = validate_layers(Preset, [Layer(str(path), f"{name}.", values)])
        for section in SECTIONS:
            for key in getattr(presets[name], section):
                check_path(f"{section}.{key}", str(path), f"{name}.")
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
            plan_runs(spec, preset_name, preset, spec.datasets[:1], spec.seeds[:1], runtime, str(folder / PRESETS_FILE))
    return specs


def preset_notes(spec: Spec, preset: str) -> list[str]:
    """The values the user set (own spec files, command line) that ``preset`` would have changed: each kept."""
    presets = load_presets(presets_folder(spec.folder))
    if preset not in presets:
        raise InputError(f"--preset: unknown preset {preset!r}; known presets: {', '.join(presets)}")
    return preset_conflicts(spec, preset, presets[preset])


def with_overrides(spec: Spec, tokens: Sequence[str]) -> Spec:
    """``spec`` with the command line's ``section.field=value`` overrides; ``a,b`` sweeps both values.

    Values are read as TOML values (``1e-5``, ``true``, ``"text"``, ``[3, 6]``); a bare word is a string
    and ``[sdm,itc]`` a list of them. The values themselves are validated when the runs are planned.
    """
    overrides: dict[str, tuple[Any, ...]] = dict(spec.overrides)
    for token in tokens:
        key, sep, text = token.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{token}: expected an override SECTION.FIELD=VALUE (e.g. train.lr=1e-5)")
        check_path(key, "command line", "")
        values = tuple(override_value(part) for part in split_top_level(text))
        if not values:
            raise InputError(f"command line: {key}: no value given")
        overrides[key] = values
    return replace(spec, overrides=overrides)


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def override_value(text: str) -> Any:
    """One override value: a TOML value, else a list of bare words in brackets, else the text itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        return [override_value(part) for part in split_top_level(text[1:-1])]
    return text


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
    for option in ("data_root", "clip_weights"):  # absolute: a run executes (or is audited) from any folder
        if values.get(option):
            values[option] = str(Path(values[option]).expanduser().absolute())
    return plan_runs(spec, preset, chosen, unique(datasets or spec.datasets), unique(seeds or spec.seeds), values,
                     str(presets_folder(spec.folder) / PRESETS_FILE))


# ---- internals ------------------------------------------------------------------------------------


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
    validate_layers(SpecFile, [Layer(str(path), "", raw)])
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
