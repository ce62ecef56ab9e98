"""`php-run table`: tables from the registry to the terminal and to reports/."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import (
    REPORTS_DIR,
    DbOption,
    JsonOption,
    PresetOption,
    console,
    err_console,
    print_json,
    say,
)
from php_runner.cli.outputs import check_outputs
from php_runner.errors import InputError
from php_runner.store.registry import Registry

if TYPE_CHECKING:
    from php_runner.experiment.schema import Spec


def damaged_checkpoints(registry: Registry, run_ids: list[int]) -> list[str]:
    """One line per recorded checkpoint of these runs whose file is missing or no longer has its sha256."""
    from php_runner.store.checksums import checkpoint_problem

    lines = []
    for run_id in run_ids:
        for record in registry.checkpoints(run_id):
            problem = checkpoint_problem(record.path, record.sha256)
            if problem is not None:
                lines.append(f"run {run_id}: checkpoint {record.role} {record.path}: {problem}")
    return lines


def print_tables(names: list[str], db: str | None, include_empty: bool, as_json: bool, preset: str,
                 fmt: str = "rich", index: bool = False, spec: "Spec | None" = None,
                 reference: str | None = None) -> None:
    """Render tables from the registry to the terminal (``fmt``: rich, markdown, csv or latex) and to
    reports/ (markdown, CSV, LaTeX, figures; with ``index`` also reports/index.md).

    Only runs of ``preset`` whose config is the cell's recipe fill a table's trained lines (imported
    checkpoints are always shown); how many matched and which were left out go to stderr (or the
    terminal). With ``spec`` (a user's variant naming a table), its own runs are added as rows of their
    own beside the paper's. Only the requested content goes to stdout when it is machine-readable.
    """
    from php_runner.reports import publish, render
    from php_runner.reports import tables as reports

    from php_runner.cli.common import specs_folder
    from php_runner.experiment.specs import load_all_specs

    machine = as_json or fmt != "rich"
    table_specs = {shipped.table: shipped for shipped in load_all_specs(specs_folder()).values() if shipped.table}
    registry = Registry(db, read_only=True)
    views, run_ids, messages = [], set(), []
    for name in names:
        rows, matched, lines = _recipe_rows(registry, name, table_specs[name], preset, spec)
        messages += lines
        run_ids.update(matched)
        if rows or include_empty:
            views.append(reports.build_table(name, rows, preset=preset, reference_row=reference))
    damaged = damaged_checkpoints(registry, sorted(run_ids))
    other_presets = _presets_with_results(registry, names, preset) if not run_ids else {}
    registry.close()
    for line in damaged:
        err_console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    check_outputs([REPORTS_DIR / f"{view.file_stem}{ext}" for view in views for ext in (".md", ".csv", ".tex", ".png")]
                  + [REPORTS_DIR / "index.md"] * index, "table: report", db=db)
    written = [path for view in views for path in publish.write_reports(view, REPORTS_DIR)]
    if index:
        written.append(publish.write_index(views, REPORTS_DIR, preset))
    if as_json:
        print_json([dataclasses.asdict(view) for view in views])
    else:
        for view in views:
            if fmt == "rich":
                console.print(render.render_rich(view))
                comparisons = render.render_comparisons_rich(view)
                if comparisons is not None:
                    console.print(comparisons)
            else:
                typer.echo(render.RENDERERS[fmt](view))
    for line in messages:
        say(line, machine)
    if other_presets:
        found = ", ".join(f"--preset {name} ({count} run(s))" for name, count in sorted(other_presets.items()))
        say(f"No results under --preset {preset}; recorded results are under {found}.", machine)
    elif not views:
        say("No results recorded yet. Start with: php-run demo   (php-run table --all lists what to run)", machine)
    if written:
        say(f"[dim]written: {', '.join(str(p) for p in written)}[/dim]", machine)


def _recipe_rows(registry: Registry, name: str, shipped: "Spec", preset: str, spec: "Spec | None"
                 ) -> tuple[list, set[int], list[str]]:
    """(result rows of the recipes of ``shipped``, the spec filling table ``name``; ids of the runs shown;
    messages); with ``spec`` also that spec's own rows."""
    from php_runner.reports.recipes import CellFilter, cell_recipes

    try:
        recipes = cell_recipes(shipped, preset)
    except InputError:  # a preset of a user's own presets.toml: the shipped recipes cannot be scaled by it
        rows = registry.result_rows(name, preset=preset)
        return rows, {run.id for run in registry.list_runs(status="done", table=name, preset=preset)}, [
            f"table {name}: preset {preset!r} is not a shipped preset; every run of it labelled {name} is shown"]
    cells = CellFilter(recipes, label=f"table {name} (--preset {preset})")
    rows = registry.result_rows(name, preset=preset, accept=cells.accept)
    for run in registry.list_runs(status="done", table=name):  # also done runs without results (checkpoint check)
        if run.preset == preset or run.kind == "imported":
            cells.accept(run, run.row_label)
    messages = cells.summary() if cells.matched or cells.left_out else []
    if spec is not None:
        own = CellFilter(cell_recipes(spec, preset), label=f"spec {spec.name} (--preset {preset})")
        mine = [row for row in registry.result_rows(name, preset=preset, accept=own.accept)
                if row.spec_name == spec.name and row.kind != "imported"]
        rows += [dataclasses.replace(row, row_label=f"{spec.name}: {row.row_label}") for row in mine]
        messages += [f"spec {spec.name} (--preset {preset}): {len({(r.dataset, r.seed, r.row_label) for r in mine})} "
                     f"result(s) of its own runs, shown as rows '{spec.name}: ...'"]
        cells.matched |= own.matched
    return rows, cells.matched, messages


def _presets_with_results(registry: Registry, names: list[str], preset: str) -> dict[str, int]:
    """Presets other than ``preset`` with done runs in these tables: preset -> number of runs."""
    counts: dict[str, int] = {}
    for name in names:
        for run in registry.list_runs(status="done", table=name, kind="trained"):
            if run.preset != preset:
                counts[run.preset] = counts.get(run.preset, 0) + 1
    return counts


@app.command()
def table(
    name: Annotated[str | None, typer.Argument(help="A table: headline, module, loss, cnum, beta, sharing, coupling, "
                                               "or 'tune' followed by a study name.")] = None,
    study: Annotated[str | None, typer.Argument(help="With 'tune': the Optuna study to show.")] = None,
    all_tables: Annotated[bool, typer.Option("--all", help="Every table, also those with no results yet "
                                             "(their cells say which command fills them).")] = False,
    preset: PresetOption = "paper",
    fmt: Annotated[str, typer.Option("--format", help="What to print: rich (the terminal table), markdown, csv "
                                     "or latex (booktabs).")] = "rich",
    as_json: JsonOption = False,
    spec_path: Annotated[str | None, typer.Option("--spec", help="A spec file (or shipped spec) naming a table: its "
                                                  "own runs as rows beside the paper's.")] = None,
    db: DbOption = None,
    reference: Annotated[str | None, typer.Option("--reference", help="The row every other row is compared with "
                                                  "(default: the table's baseline in paper_claims.toml).")] = None,
) -> None:
    """Render paper tables from the registry (paper value, ours as mean +- std over seeds, delta).

    Also writes each table to reports/ as markdown, CSV and LaTeX, with figures for module, cnum and
    beta (NAME_PRESET.* for a preset other than paper); --all also writes reports/index.md.

    Example: php-run table cnum --preset tiny     (or: php-run table tune my-study)
    """
    from php_runner.experiment.paper import table_names

    if name == "tune":
        _print_study(study, db, as_json)
        return
    if study is not None:
        raise InputError(f"table {name!r}: a study name goes only with 'table tune STUDY'")
    known = list(table_names())
    if name is not None and name not in known:
        raise InputError(f"table {name!r}: expected one of {', '.join(known)}")
    from php_runner.reports.render import RENDERERS

    if fmt != "rich" and fmt not in RENDERERS:
        raise InputError(f"--format: expected rich, {', '.join(RENDERERS)}, got {fmt!r}")
    spec = None
    if spec_path is not None:
        from php_runner.experiment.specs import find_spec, load_spec

        spec = load_spec(find_spec(spec_path))
        if spec.table is None:
            raise InputError(f"--spec {spec_path}: the spec names no table (set table = \"headline\" or another "
                             f"table of {', '.join(known)}); php-run status --spec {spec.name} lists its runs")
        if name is not None and name != spec.table:
            raise InputError(f"--spec {spec_path}: it fills table {spec.table!r}, not {name!r}")
        name = spec.table
    names = [name] if name is not None else known
    print_tables(names, db, include_empty=all_tables or name is not None, as_json=as_json, preset=preset, fmt=fmt,
                 index=all_tables, spec=spec, reference=reference)


def _print_study(study: str | None, db: str | None, as_json: bool) -> None:
    """The tuning table of one Optuna study: trials, best parameters, importances, best trial's test metrics."""
    from php_runner.studies.tuning import tune_table

    if study is None:
        raise InputError("table tune: give the study name, e.g. php-run table tune php-tiny")
    renderable, data = tune_table(study, db)
    if as_json:
        print_json(data)
    else:
        console.print(renderable)
