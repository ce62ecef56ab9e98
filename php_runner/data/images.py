"""Reading dataset images: the header is checked against the pixel limit before anything is decoded,
and a truncated or undecodable file is refused by path rather than decoded into grey rows.

The official reader allows truncated images (spec 6, ``LOAD_TRUNCATED_IMAGES``); php-run does not,
deliberately: a damaged download must not train on damaged pixels silently. Pillow's own
decompression-bomb guard is replaced by the stated limit ``MAX_IMAGE_PIXELS`` (data/limits.py),
checked from the header, so the limit can be raised and the error is one line.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from PIL import Image, ImageFile

from php_runner.data.datasets import DatasetError
from php_runner.data.limits import MAX_IMAGE_PIXELS

# Both are checked here instead (truncation by Pillow's own load, pixels against our stated limit).
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None


class ImageFileError(DatasetError):
    """A dataset image that cannot be used: unreadable, truncated, or larger than the pixel limit."""


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``; a bad file gives a one-line ``ImageFileError`` naming it."""
    try:
        with Image.open(path) as image:
            check_pixels(path, image.width, image.height)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Pillow reports broken streams as OSError (truncation included), some header faults as
        # SyntaxError or ValueError.
        raise ImageFileError(f"{path}: cannot be read as an image ({' '.join(str(err).split())})") from None


def check_pixels(path: str, width: int, height: int) -> None:
    limit = MAX_IMAGE_PIXELS.value()
    if width * height > limit:
        raise ImageFileError(f"{path}: {width}x{height} image has {width * height} pixels, over the limit of "
                             f"{limit} (${MAX_IMAGE_PIXELS.env}); refused before decoding")


def image_problems(paths: Sequence[str], workers: int = 4,
                   on_done: Callable[[], None] | None = None) -> list[tuple[str, str]]:
    """Decode every image once; ``(path, problem)`` for each that is unreadable, truncated or oversized.

    ``on_done`` is called after each image (a progress bar's advance).
    """

    def decode(path: str) -> tuple[str, str] | None:
        try:
            read_image(path)
        except ImageFileError as err:
            return path, str(err)
        finally:
            if on_done is not None:
                on_done()
        return None

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        return [found for found in pool.map(decode, paths) if found is not None]


@contextmanager
def counting_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable (thread-safe) drawing a rich bar on a terminal's stderr, else a no-op."""
    if not (enabled and sys.stderr.isatty() and total):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    lock = threading.Lock()
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("images", total=total)

        def advance() -> None:
            with lock:
                bar.advance(task)

        yield advance
