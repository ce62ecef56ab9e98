"""``php-run ls``, ``php-run cat`` and ``php-run validate``: the shipped specs, one spec resolved, every spec
checked (the torchtune ls/cat/validate pattern).

Each shipped spec opens with a comment header whose ``# Runs:``, ``# Fills:`` and ``# Cost:``
entries (continued on indented comment lines) say how to run it, what it fills and what it costs;
``ls`` reads them from the files rather than repeating them in fields, so the header stays the one
place they are written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import JsonOption, console, print_json, specs_folder

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


def catalog() -> list[dict[str, Any]]:
    """One entry per shipped spec: name, table, description, runs per seed, and its header entries."""
    from php_runner.experiment.specs import load_all_specs

    entries = []
    for name, spec in sorted(load_all_specs().items()):
        header = spec_header(spec.path)
        entries.append({
            "spec": name, "table": spec.table, "description": spec.description,
            "runs_per_seed": len(spec.points) * len(spec.datasets), "path": str(spec.path),
            "runs": header.get("Runs"), "fills": header.get("Fills"), "cost": header.get("Cost"),
        })
    return entries


def resolved_spec(name_or_path: str, preset: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """A spec with its ``extends`` chain (and ``preset``'s section values) merged: (TOML-able dict, comments).

    The dict is itself a valid spec file with no ``extends``: loading it gives the same runs (the
    same config hashes) as the original, under any preset, or under ``preset`` when one was applied.
    """
    from php_runner.errors import InputError
    from php_runner.experiment.schema import SECTIONS
    from php_runner.experiment.specs import find_spec, load_presets, load_spec, presets_folder

    spec = load_spec(find_spec(name_or_path))
    comments = ["resolved from " + " -> ".join(str(path) for path in spec.chain)]
    sections = {name: dict(spec.sections[name]) for name in SECTIONS}
    if preset is not None:
        folder = presets_folder(spec.folder)
        presets = load_presets(folder)
        if preset not in presets:
            raise InputError(f"--preset: unknown preset {preset!r}; known presets: {', '.join(presets)}")
        chosen = presets[preset]
        for name in SECTIONS:
            sections[name].update(getattr(chosen, name))  # section fields are leaves: a preset value replaces
        comments.append(f"with preset {preset!r} of {folder / 'presets.toml'}: {chosen.description}")
        if chosen.runtime:
            comments.append("its runtime defaults: " + ", ".join(f"{k} = {v!r}" for k, v in chosen.runtime.items()))
        if chosen.requires:
            comments.append("it requires: " + ", ".join(f"--{option.replace('_', '-')}" for option in chosen.requires))
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
    if grid:
        resolved["grid"] = grid
    if spec.tune is not None:
        resolved["tune"] = spec.tune.model_dump(mode="json", exclude_none=True)
    return resolved, comments


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
    """List the shipped specs: the table each fills, its runs per seed, and its cost (from its header).

    Example: php-run ls
    """
    entries = catalog()
    if as_json:
        print_json(entries)
        return
    view = Table(title=f"{len(entries)} shipped specs (php-run cat NAME prints one; php-run run NAME runs it)",
                 show_lines=True)
    for column in ("spec", "table", "runs/seed", "description", "cost"):
        view.add_column(column, no_wrap=column in ("spec", "table"))
    for entry in entries:
        view.add_row(entry["spec"], entry["table"] or "-", str(entry["runs_per_seed"]), entry["description"],
                     entry["cost"] or "")
    console.print(view)


@app.command("cat")
def cat_spec(
    spec: Annotated[str, typer.Argument(help="A shipped spec's name (php-run ls) or a spec file.")],
    preset: Annotated[str | None, typer.Option("--preset", help="Also apply this preset's values (paper, tiny).")]
    = None,
) -> None:
    """Print a spec resolved: its extends chain merged (and a preset applied), as TOML.

    The output is itself a spec file: save it, edit it and run it with php-run run FILE.

    Example: php-run cat cnum --preset tiny
    """
    import tomli_w

    resolved, comments = resolved_spec(spec, preset)
    typer.echo("".join(f"# {line}\n" for line in comments) + "\n" + tomli_w.dumps(resolved), nl=False)


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
