"""``php-run cache build|check|clear``: the decoded image cache by hand (training builds it on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from php_runner.cli import app
from php_runner.cli.common import EXIT_BAD_INPUT, JsonOption, console, err_console, print_json
from php_runner.errors import InputError

cache_app = typer.Typer(
    help="The decoded image cache (under $PHP_RUN_CACHE, default ~/.cache/php-run).\n\n"
    "Example: php-run cache build --data-root data --dataset CUHK-PEDES",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

DataRoot = Annotated[Path, typer.Option("--data-root", help="Folder holding the dataset folder.")]
Dataset = Annotated[str, typer.Option("--dataset", help="CUHK-PEDES, ICFG-PEDES or RSTPReid.")]
ImageSize = Annotated[str, typer.Option("--image-size", help="Model input size HxW (the paper's: 384x128).")]
Workers = Annotated[int | None, typer.Option("--workers", help="Decoding threads (default: every CPU).", min=1)]


def parse_image_size(text: str, option: str = "--image-size") -> tuple[int, int]:
    """``"384x128"`` -> ``(384, 128)``; anything else is a one-line error naming ``option``."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{option}: expected HxW such as 384x128, got {text!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"{option}: expected positive sizes, got {text!r}")
    return height, width


@cache_app.command("build")
def cache_build(data_root: DataRoot, dataset: Dataset, image_size: ImageSize = "384x128", workers: Workers = None,
                force: Annotated[bool, typer.Option("--force", help="Rebuild even a sound, current cache.")] = False,
                ) -> None:
    """Decode and resize every image of a dataset into its cache (kept when already sound and current).

    Example: php-run cache build --data-root data --dataset ICFG-PEDES --image-size 384x128
    """
    from php_runner.data import read_dataset
    from php_runner.data.cache import open_cache

    cache = open_cache(read_dataset(data_root, dataset), parse_image_size(image_size), workers=workers, rebuild=force)
    size = cache.manifest["array"]["bytes"]
    console.print(f"{cache.folder}: {len(cache.array)} images, {size / 2**30:.2f} GiB, verified")


@cache_app.command("check")
def cache_check(data_root: DataRoot, dataset: Dataset, image_size: ImageSize = "384x128", workers: Workers = None,
                as_json: JsonOption = False) -> None:
    """Verify a dataset's cache (manifest current, size, every chunk's CRC32); exit 2 on any problem.

    Example: php-run cache check --data-root data --dataset CUHK-PEDES
    """
    from php_runner.data import read_dataset
    from php_runner.data.cache import cache_dir_for, check_cache

    ds, size = read_dataset(data_root, dataset), parse_image_size(image_size)
    folder = cache_dir_for(ds, size)
    problems = check_cache(folder, ds, size, workers)
    if as_json:
        print_json({"folder": str(folder), "problems": problems})
    else:
        for problem in problems:
            err_console.print(f"[red]problem:[/red] {problem}", highlight=False, soft_wrap=True)
        if not problems:
            console.print(f"[green]{folder}: sound and current[/green]")
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)


@cache_app.command("clear")
def cache_clear(dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset's caches.")] = None,
                ) -> None:
    """Delete the caches (all, or one dataset's) under the cache folder.

    Example: php-run cache clear --dataset RSTPReid
    """
    from php_runner.data.cache import cache_root, clear_caches, list_caches

    listed = {folder: manifest for folder, manifest in list_caches()}
    removed = clear_caches(dataset=dataset)
    view = Table(title=f"removed under {cache_root()}")
    for column in ("cache", "images", "GiB"):
        view.add_column(column)
    for folder in removed:
        manifest = listed.get(folder) or {}
        array = manifest.get("array", {})
        view.add_row(folder.name, str(array.get("shape", ["?"])[0]), f"{array.get('bytes', 0) / 2**30:.2f}")
    console.print(view if removed else f"no caches under {cache_root()}")
