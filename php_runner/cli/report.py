"""``php-run report coupling``: the coupling-artefact report from the registry."""

from __future__ import annotations

from typing import Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import DbOption, console

report_app = typer.Typer(help="Reports built from the registry.\n\n"
                         "Example: php-run report coupling --dataset ICFG-PEDES --preset tiny-icfg-scale",
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
