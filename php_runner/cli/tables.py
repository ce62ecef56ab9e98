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
)
from php_runner.cli.outputs import check_outputs
from php_runner.errors import InputError
from php_runner.store.registry import Registry

if TYPE_CHECKING:
    pass


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
                 fmt: str = "rich", index: bool = False) -> None:
    """Render tables from the registry to the terminal (``fmt``: rich, markdown, csv or latex) and to
    reports/ (markdown, CSV, LaTeX, figures; with ``index`` also reports/index.md).

    Only runs of ``preset`` fill the trained lines (imported checkpoints are always shown).
    """
    from php_runner.reports import publish, render
    from php_runner.reports import tables as reports

    registry = Registry(db, read_only=True)
    views, run_ids = [], set()
    for name in names:
        rows = registry.result_rows(name, preset=preset)
        run_ids.update(run.id for run in registry.list_runs(status="done", table=name)
                       if run.preset == preset or run.kind == "imported")
        if rows or include_empty:
            views.append(reports.build_table(name, rows, preset=preset))
    damaged = damaged_checkpoints(registry, sorted(run_ids))
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
        return
    for view in views:
        if fmt == "rich":
            console.print(render.render_rich(view))
        else:
            typer.echo(reports.RENDERERS[fmt](view))
    if not views:
        console.print("No results recorded yet. Start with: php-run demo   (php-run table --all lists what to run)")
    if written:
        console.print(f"[dim]written: {', '.join(str(p) for p in written)}[/dim]")


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
    db: DbOption = None,
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
    names = [name] if name is not None else known
    print_tables(names, db, include_empty=all_tables or name is not None, as_json=as_json, preset=preset, fmt=fmt,
                  index=all_tables)


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
