"""``php-run report coupling``: the coupling-artefact report from the registry."""

from __future__ import annotations

from typing import Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import DbOption, console

report_app = typer.Typer(help="Reports built from the registry.\n\n"
                         "Example: php-run report coupling --dataset ICFG-PEDES --preset tiny-icfg-scale\n\n"
                         "Example: php-run report claims --preset tiny",
                         no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("coupling")
def coupling(
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid.")] = "ICFG-PEDES",
    preset: Annotated[str, typer.Option("--preset", help="The preset the coupling runs used.")] = "tiny-icfg-scale",
    db: DbOption = None,
) -> None:
    """Write reports/coupling_artefact.md and .png: ordered, shuffled and alone R1 of the audited coupling runs.

    Example: php-run report coupling --dataset ICFG-PEDES --preset tiny-icfg-scale
    """
    from php_runner.cli.common import REPORTS_DIR
    from php_runner.reports.coupling import write_report
    from php_runner.store.registry import Registry

    registry = Registry(db)
    try:
        written = write_report(registry, dataset, preset, REPORTS_DIR)
    finally:
        registry.close()
    console.print(f"written: {', '.join(str(path) for path in written)}")


@report_app.command("claims")
def claims(
    preset: Annotated[str, typer.Option("--preset", help="The preset whose trained runs fill the claims "
                                        "(imported runs are always included).")] = "paper",
    db: DbOption = None,
) -> None:
    """Write reports/claims.md (claims_PRESET.md) and its figure: every claim of the paper with our difference,
    interval, verdict, seeds used, seeds to resolve, the paper's difference and the shuffled-order difference;
    the report index (reports/index.md) is rewritten to link it.

    Example: php-run report claims --preset tiny
    """
    from php_runner.cli.common import REPORTS_DIR
    from php_runner.experiment.paper import table_names
    from php_runner.reports import publish
    from php_runner.reports.claims import write_claims_report
    from php_runner.reports.tables import build_table
    from php_runner.store.registry import Registry

    registry = Registry(db)
    try:
        rows = registry.result_rows(preset=preset)
    finally:
        registry.close()
    written = write_claims_report(rows, REPORTS_DIR, preset)
    views = [build_table(name, [r for r in rows if r.table == name], preset=preset) for name in table_names()
             if any(r.table == name for r in rows)]
    written.append(publish.write_index(views, REPORTS_DIR, preset))
    console.print(f"written: {', '.join(str(path) for path in written)}")
