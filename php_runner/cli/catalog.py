"""``php-run ls``, ``php-run cat`` and ``php-run validate``: the shipped specs, one spec resolved, every spec
checked (the torchtune ls/cat/validate pattern).

Each shipped spec opens with a comment header whose ``# Runs:``, ``# Fills:`` and ``# Cost:``
entries (continued on indented comment lines) say how to run it, what it fills and what it costs;
``ls`` reads them from the files rather than repeating them in fields, so the header stays the one
place they are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import JsonOption, OverridesArgument, console, note, print_json, specs_folder

HEADER_KEYS = ("Runs", "Fills", "Cost")
_ENTRY = re.compile(rf"^#\s*({'|'.join(HEADER_KEYS)}):\s*(.*)$")
_CONTINUATION = re.compile(r"^#\s{2,}(\S.*)$")
def spec_header(path: Path) -> dict[str, str]:
    """The ``Runs``/``Fills``/``Cost`` entries of a spec's leading comment block, continuation lines joined."""
    entries: dict[str, list[str]] = {}
    current: str | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        entry = _ENTRY.match(line)
        continuation = _CONTINUATION.match(line)
        if entry:
            current = entry.group(1)
            entries[current] = [entry.group(2).strip()]
        elif continuation and current is not None:
            entries[current].append(continuation.group(1).strip())
        else:
            current = None
    return {key: " ".join(parts) for key, parts in entries.items()}


def machine_device_name() -> str:
    """This machine's device as ``php-run bench`` records it (its first CUDA device, else the CPU)."""
    import torch

    from php_runner.execute.provenance import provenance_info

    return provenance_info("cuda" if torch.cuda.is_available() else "cpu", None)["device"]


def catalog() -> list[dict[str, Any]]:
    """One entry per shipped spec: name, table, description, runs per seed, its header entries, and its
    GPU-hours at the last bench recorded (reports/benchmarks.jsonl) on this machine's device, unpacked and
    packed (``reports/spec_cost.py``)."""
    from php_runner.experiment.specs import load_all_specs
    from php_runner.reports.spec_cost import latest_bench, spec_cost

    bench = latest_bench(machine_device_name())
    entries = []
    for name, spec in sorted(load_all_specs().items()):
        header = spec_header(spec.path)
        entries.append({
            "spec": name, "table": spec.table, "description": spec.description,
            "runs_per_seed": len(spec.points) * len(spec.datasets), "path": str(spec.path),
            "runs": header.get("Runs"), "fills": header.get("Fills"), "cost": header.get("Cost"),
            **asdict(spec_cost(spec, bench)),
        })
    return entries


def resolved_spec(name_or_path: str, preset: str | None = None, overrides: list[str] | None = None
                  ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """A spec with its ``extends`` chain, ``preset``'s values and the command line's overrides merged, in the
    order runs use (recipe, preset, the user's own files, overrides): (TOML-able dict, comments, origin
    of each ``section.field`` and ``grid.KEY``).

    The dict is itself a valid spec file with no ``extends``: loading it gives the same runs (the
    same config hashes) as the original under ``preset`` when one was applied (without one, under
    any preset for a spec whose values all come from its recipe, as the shipped specs' do).
    """
    from php_runner.experiment.schema import SECTIONS
    from php_runner.experiment.specs import find_spec, load_spec, with_overrides

    spec = with_overrides(load_spec(find_spec(name_or_path)), overrides or [])
    comments = ["resolved from " + " -> ".join(str(path) for path in spec.chain)]
    layers = list(spec.file_sections) or [(str(spec.path), spec.sections)]
    if preset is not None:
        layer, preset_comments = preset_layer(spec.folder, preset)
        layers.insert(1, layer)
        comments += preset_comments
    single = {key: values[0] for key, values in spec.overrides.items() if len(values) == 1}
    layers.append(("command line", {name: {key.split(".")[1]: value for key, value in single.items()
                                           if key.startswith(name + ".")} for name in SECTIONS}))
    if spec.overrides:
        comments.append("overrides: " + " ".join(f"{key}={','.join(map(str, values))}"
                                                  for key, values in spec.overrides.items()))
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origins: dict[str, str] = {}
    for origin, values in layers:
        for name in SECTIONS:
            for key, value in values.get(name, {}).items():
                sections[name][key] = value  # section fields are leaves: a later layer's value replaces
                origins[f"{name}.{key}"] = origin
    resolved: dict[str, Any] = {"description": spec.description}
    if spec.table is not None:
        resolved["table"] = spec.table
    if len(spec.points) == 1 and not spec.points[0].values:
        resolved["row_label"] = spec.points[0].label
    resolved |= {"datasets": list(spec.datasets), "seeds": list(spec.seeds)}
    if spec.audit:
        resolved["audit"] = True
    resolved |= sections
    grid = _grid_of(spec)
    origins |= {f"grid.{key}": f"grid of {spec.path}" for key in grid}
    for key, values in spec.overrides.items():
        if len(values) > 1:
            grid[key] = list(values)
            origins[f"grid.{key}"] = "command line (sweep)"
    if grid:
        resolved["grid"] = grid
    if spec.tune is not None:
        resolved["tune"] = spec.tune.model_dump(mode="json", exclude_none=True)
    return resolved, comments, origins


def preset_layer(spec_folder: Path, preset: str) -> tuple[tuple[str, dict[str, Any]], list[str]]:
    """The values ``preset`` (from the presets beside ``spec_folder``) lays under the user's own, as an
    (origin, sections) layer, and the comments that say what it is, its runtime defaults and needs."""
    from php_runner.errors import InputError
    from php_runner.experiment.schema import SECTIONS
    from php_runner.experiment.specs import load_presets, presets_folder

    folder = presets_folder(spec_folder)
    presets = load_presets(folder)
    if preset not in presets:
        raise InputError(f"--preset: unknown preset {preset!r}; known presets: {', '.join(presets)}")
    chosen = presets[preset]
    comments = [f"with preset {preset!r} of {folder / 'presets.toml'}: {chosen.description}",
                "values written in the files extending the recipe and on the command line win over the preset's"]
    if chosen.runtime:
        comments.append("its runtime defaults: " + ", ".join(f"{k} = {v!r}" for k, v in chosen.runtime.items()))
    if chosen.requires:
        comments.append("it requires: " + ", ".join(f"--{option.replace('_', '-')}" for option in chosen.requires))
    return (f"preset {preset}", {name: getattr(chosen, name) for name in SECTIONS}), comments


def explained_toml(resolved: dict[str, Any], origins: dict[str, str]) -> str:
    """``resolved`` as TOML with each section and grid value's origin as a comment on its line."""
    import tomli_w

    from php_runner.experiment.schema import SECTIONS

    tables = {key: value for key, value in resolved.items() if key in (*SECTIONS, "grid")}
    lines = [tomli_w.dumps({key: value}).rstrip("\n") for key, value in resolved.items() if key not in tables]
    for section, values in tables.items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            name = json.dumps(key) if section == "grid" else key  # grid keys are dotted: quoted
            shown = json.dumps(value) if isinstance(value, list) else tomli_w.dumps({"v": value})[4:].rstrip("\n")
            origin = origins.get(f"{section}.{key}")
            lines.append(f"{name} = {shown}" + (f"  # {origin}" if origin else ""))
    return "\n".join(lines) + "\n"


def _grid_of(spec) -> dict[str, list]:
    """The grid lists back from the points (their cartesian product), values in first-seen order."""
    grid: dict[str, list] = {}
    for point in spec.points:
        for key, value in point.values.items():
            values = grid.setdefault(key, [])
            if value not in values:
                values.append(value)
    return grid


@app.command("ls")
def list_specs(as_json: JsonOption = False) -> None:
    """List the shipped specs: the table each fills, its runs per seed, its cost (from its header), and its
    GPU-hours (all seeds) at the last bench recorded on this machine's device: one run at a time on the
    device (the bench's projection of the regime each run trains in), and packed as the bench's --packed
    measurement ran (N runs of its regime at once; each run's device hours = its training at the N runs'
    aggregate samples/s, its evaluation at the unpacked rates), when it packed the runs' regime.

    Example: php-run ls
    """
    entries = catalog()
    if as_json:
        print_json(entries)
        return
    view = Table(title=f"{len(entries)} shipped specs (php-run cat NAME prints one; php-run run NAME runs it)",
                 show_lines=True)
    for column in ("spec", "table", "runs/seed", "description", "cost", "GPU-h (bench)", "GPU-h packed"):
        view.add_column(column, no_wrap=column in ("spec", "table"))
    for entry in entries:
        hours = "not measured" if entry["gpu_hours"] is None else f"{entry['gpu_hours']:.1f}"
        packed = "not measured" if entry["gpu_hours_packed"] is None else f"{entry['gpu_hours_packed']:.1f}"
        view.add_row(entry["spec"], entry["table"] or "-", str(entry["runs_per_seed"]), entry["description"],
                     entry["cost"] or "", hours, packed)
    console.print(view)
    for column, key in (("GPU-h", "gpu_hours_basis"), ("GPU-h packed", "gpu_hours_packed_basis")):
        for basis in dict.fromkeys(entry[key] for entry in entries):
            note(f"{column}: all seeds, {basis}")


@app.command("cat")
def cat_spec(
    spec: Annotated[str, typer.Argument(help="A shipped spec's name (php-run ls) or a spec file.")],
    overrides: OverridesArgument = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Also apply this preset's values (paper, tiny).")]
    = None,
    explain: Annotated[bool, typer.Option("--explain", help="Say where each value comes from (spec file, preset, "
                                          "grid, command line) in a comment on its line.")] = False,
) -> None:
    """Print a spec resolved: its extends chain merged (a preset and key=value overrides applied), as TOML.

    The output is itself a spec file: save it, edit it and run it with php-run run FILE.

    Example: php-run cat cnum --preset tiny --explain   (or: php-run cat headline train.lr=1e-5)
    """
    import tomli_w

    resolved, comments, origins = resolved_spec(spec, preset, overrides)
    if preset is not None:
        from php_runner.experiment.specs import find_spec, load_spec, preset_notes, with_overrides

        for line in preset_notes(with_overrides(load_spec(find_spec(spec)), overrides or []), preset):
            note(f"note: {line}")
    body = explained_toml(resolved, origins) if explain else tomli_w.dumps(resolved)
    typer.echo("".join(f"# {line}\n" for line in comments) + "\n" + body, nl=False)


@app.command()
def validate() -> None:
    """Load and check every shipped spec; errors name the file and the field.

    Example: php-run validate
    """
    from php_runner.experiment.specs import load_all_specs

    specs = load_all_specs(specs_folder())
    view = Table(title=f"{len(specs)} specs valid")
    for column in ("spec", "table", "description"):
        view.add_column(column)
    for name, spec in sorted(specs.items()):
        view.add_row(name, spec.table or "-", getattr(spec, "description", "") or "")
    console.print(view)
