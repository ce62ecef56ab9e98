"""The php-run command line (Typer). ``app`` is the console-script entry point.

Each command module registers its commands on ``app`` with ``@app.command()`` when imported, so the
imports at the bottom of this file assemble the whole command line.
"""

import typer

from php_runner.cli.common import PhpRunGroup

app = typer.Typer(
    name="php-run",
    cls=PhpRunGroup,
    help="Reproduce, ablate and audit PHP (text-based person retrieval) with a resumable run registry.\n\n"
    "Example: php-run demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

from php_runner.cli import (  # noqa: E402,F401  (they register commands)
    audit,
    bench,
    cache,
    catalog,
    data,
    db,
    evaluate,
    export,
    importing,
    launch,
    plot,
    report,
    running,
    status,
    tables,
    tune,
)
