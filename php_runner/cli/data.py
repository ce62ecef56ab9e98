"""`php-run synth` and `php-run data check`: synthetic datasets and dataset checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import (
    EXIT_BAD_INPUT,
    console,
    err_console,
)
from php_runner.errors import InputError

if TYPE_CHECKING:
    pass


data_app = typer.Typer(help="Dataset tools.\n\nExample: php-run data check --data-root data --dataset RSTPReid",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def synth(
    root: Annotated[Path, typer.Option("--root", help="Folder to write the dataset folders into.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES, RSTPReid or all.")] = "all",
    ids: Annotated[int | None, typer.Option("--ids", help="Training identities per dataset (default: demo size).",
                                            min=1)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes the same files.")] = 0,
    test_ids: Annotated[int | None, typer.Option("--test-ids", help="Test identities (default: half the "
                                                 "training identities).", min=1)] = None,
    test_images_per_id: Annotated[int, typer.Option("--test-images-per-id", help="Test images per identity.",
                                                    min=1)] = 2,
    test_captions_per_image: Annotated[int | None, typer.Option("--test-captions-per-image", help="Test captions "
                                                                "per image (default: the format's, 1 for "
                                                                "ICFG-PEDES, else 2).", min=1)] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="A named set instead of the size options: "
                                                "icfg-scale (ICFG-PEDES format, 2,000 test images).")] = None,
) -> None:
    """Write synthetic datasets in the official on-disk formats (JPEG images + annotation JSON).

    Example: php-run synth --root data/synthetic --dataset all --ids 40 --seed 0
    (or: php-run synth --root data/synthetic-icfg-scale --variant icfg-scale)
    """
    from php_runner.data import TestSplitSize, write_synthetic, write_variant

    if variant is not None:
        if ids is not None or test_ids is not None or test_captions_per_image is not None or test_images_per_id != 2:
            raise InputError("--variant: fixes the sizes; give it without --ids and the --test-* options")
        console.print(f"wrote {write_variant(root, variant, seed)}")
        return
    test = TestSplitSize(test_ids, test_images_per_id, test_captions_per_image)
    for path in write_synthetic(root, dataset, ids, seed, test):
        console.print(f"wrote {path}")


@data_app.command("check")
def data_check(
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding the dataset folder.")],
    dataset: Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid.")],
) -> None:
    """Print a dataset's subset/ids/images/captions table and every problem found (exit 2 on problems).

    Example: php-run data check --data-root data --dataset CUHK-PEDES
    """
    from php_runner.data import check_dataset

    rows, problems = check_dataset(data_root, dataset)
    view = Table(title=f"{dataset} under {data_root}")
    for column in ("subset", "ids", "images", "captions"):
        view.add_column(column, justify="left" if column == "subset" else "right")
    for row in rows:
        view.add_row(*(str(row[c]) for c in ("subset", "ids", "images", "captions")))
    if rows:
        console.print(view)
    for problem in problems:
        # One line each, as every error: a newline in a path given by the user is shown as a space; brackets
        # in it are text, not rich markup.
        err_console.print(f"[red]problem:[/red] {escape(' '.join(problem.split()))}", highlight=False,
                          soft_wrap=True)
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)
    console.print(f"[green]{dataset}: no problems found[/green]")
