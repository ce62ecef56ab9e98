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
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_show_locals=False,
)



def _print_version(value: bool) -> None:
    if value:
        import php_runner

        typer.echo(f"php-run {php_runner.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print php-run's version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Reproduce, ablate and audit PHP (text-based person retrieval) with a resumable run registry.

    Example: php-run demo
    """


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
