"""``php-run plot RUN``: a run's learning curves as a PNG, drawn from the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from php_runner.cli import app
from php_runner.cli.common import DbOption, console
from php_runner.cli.outputs import check_output
from php_runner.errors import InputError
from php_runner.store.registry import Registry

CURVES_DIR = Path("reports") / "curves"


@app.command()
def plot(
    run: Annotated[str, typer.Argument(help="Run id or a prefix of its config hash.")],
    out: Annotated[Path | None, typer.Option("--out", help="PNG file to write (default: "
                                             "reports/curves/run<ID>_<HASH>.png).")] = None,
    db: DbOption = None,
) -> None:
    """Draw a run's learning curves: each loss term and test/val R1 per epoch, the selected epochs marked.

    The epochs picked by best-on-test, best-on-val and last are marked, so an outlier "best" epoch shows.

    Example: php-run plot 3
    """
    from php_runner.reports.figures import plot_learning_curves, write_png

    if out is not None:
        check_output(out, "--out", db=db)
    registry = Registry(db, read_only=True)
    try:
        record = registry.get_run(run)
        epochs, results = registry.epochs(record.id), registry.results(record.id)
    finally:
        registry.close()
    if not epochs:
        raise InputError(f"run {record.id}: no epochs recorded yet; nothing to plot")
    title = (f"run {record.id} {record.short_hash}: {record.spec_name} {record.row_label}, {record.dataset}, "
             f"seed {record.seed} ({record.status})")
    path = write_png(out or CURVES_DIR / f"run{record.id}_{record.short_hash}.png",
                     plot_learning_curves(epochs, results, title))
    console.print(f"written: {path}")
