"""The decoded image cache: every image of a dataset decoded and resized once, then memory-mapped.

The official pipelines all start with a PIL bilinear ``Resize`` to the model input size (spec 6);
the cache stores exactly the uint8 pixels that step produces (``read_image`` then
``torchvision.transforms.Resize``), so what follows (flip, pad, crop, ``ToTensor``, ``Normalize``,
erasing) sees the same bytes as in the per-sample PIL pipeline.

One cache is a folder ``<cache root>/<dataset>-<H>x<W>-<hash of the dataset folder>/`` holding
``images.npy`` (``(N, H, W, 3)`` uint8, memory-mapped on open), ``index.json`` (image path relative
to the dataset folder -> row) and ``manifest.json``. The manifest records what the pixels depend on
(dataset name, annotation file sha256, a fingerprint of every image file's size and mtime, image
size, resize rule, Pillow/torchvision/numpy versions) and what the array must be (shape, byte size,
one CRC32 per chunk of rows, the sha256 of ``index.json``). A cache is used only when its manifest
equals the one the current dataset and settings call for, ``index.json`` has the recorded sha256 and
maps the paths one-to-one onto the rows, its array has exactly the recorded size (truncation or extra
bytes), and every chunk's CRC32 matches (corruption). CRC32 runs at well over 1 GB/s per core and the pass also warms the page
cache that training reads next, so verifying everything on open costs seconds for CUHK-PEDES (about
6 GB) and nothing is ever used unchecked; per-chunk values let ``php-run cache check`` say where a
cache is damaged. A cache that fails any check is rebuilt.

Building writes into a temporary folder next to the final one and renames it into place, so a
reader never sees a half-written cache; the array's space is reserved first (``posix_fallocate``),
and staging folders of killed builders are removed under the build lock. Opening a sound cache
writes nothing, so a cache on a read-only mount is usable; only building takes the lock. The cache root is ``$PHP_RUN_CACHE`` when set, else
``$XDG_CACHE_HOME/php-run`` (``~/.cache/php-run``): the data root may be read-only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from php_runner.data.cache_manifest import (
    ARRAY_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    CacheError,
    build_manifest,
    cache_problems,
    check_cache,
    chunk_crc32s,
    dataset_images,
    expected_source,
    manifest_text,
    relative_to_root,
    sha256_of,
)
from php_runner.data.datasets import PedesDataset
from php_runner.data.images import read_image
from php_runner.data.limits import check_input_size
from php_runner.errors import InputError

__all__ = ["ARRAY_FILE", "INDEX_FILE", "MANIFEST_FILE", "CacheError", "CacheSpaceError", "ImageCache", "cache_dir_for",
           "cache_root", "check_cache", "clear_caches", "dataset_images", "list_caches", "open_cache"]

CACHE_ENV = "PHP_RUN_CACHE"


class CacheSpaceError(InputError):
    """Not enough free space where the cache is to be built."""


def cache_root() -> Path:
    """Where caches live: ``$PHP_RUN_CACHE``, else ``$XDG_CACHE_HOME/php-run``, else ``~/.cache/php-run``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "php-run"


def cache_dir_for(dataset: PedesDataset, image_size: tuple[int, int], root: Path | None = None) -> Path:
    """The cache folder of a dataset folder at an image size (one per dataset folder and size)."""
    height, width = image_size
    folder_key = hashlib.sha256(str(Path(dataset.root).resolve()).encode()).hexdigest()[:12]
    return (root or cache_root()) / f"{dataset.name}-{height}x{width}-{folder_key}"


@dataclass
class ImageCache:
    """An open, verified cache: ``array`` is the memory-mapped ``(N, H, W, 3)`` uint8 pixels."""

    folder: Path
    array: np.ndarray
    rows: dict[str, int]  # path relative to the dataset folder -> row
    dataset_root: Path
    manifest: dict

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.manifest["source"]["image_size"])

    def rows_of(self, paths: Iterable[str]) -> list[int]:
        """Rows of image paths as the dataset lists them; a path the cache lacks is a ``CacheError``."""
        found = []
        for path in paths:
            key = relative_to_root(path, self.dataset_root)
            if key not in self.rows:
                raise CacheError(f"{self.folder}: image {path} is not in the cache; run php-run cache build")
            found.append(self.rows[key])
        return found

    def pixels(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """uint8 ``(len(rows), H, W, 3)`` on the CPU, gathered in the given order."""
        index = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(self.array[index])


def _open(folder: Path, dataset_root: Path) -> ImageCache:
    """Open a cache verified just before; the index read is the one whose sha256 the manifest holds."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    index_bytes = (folder / INDEX_FILE).read_bytes()
    if hashlib.sha256(index_bytes).hexdigest() != manifest["array"]["index_sha256"]:
        raise CacheError(f"{folder / INDEX_FILE}: changed while the cache was opened; run again")
    array = np.load(folder / ARRAY_FILE, mmap_mode="r")
    return ImageCache(folder=folder, array=array, rows=json.loads(index_bytes), dataset_root=Path(dataset_root),
                      manifest=manifest)


def open_cache(dataset: PedesDataset, image_size: tuple[int, int], root: Path | None = None,
               workers: int | None = None, progress: bool = True, rebuild: bool = False) -> ImageCache:
    """The verified cache of ``dataset`` at ``image_size``, built (or rebuilt) first when needed.

    A sound cache is opened without writing anything (the cache root may be read-only); only a build
    takes the lock, which needs write access.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    workers = workers or os.cpu_count() or 1
    paths = dataset_images(dataset)
    check_input_size(*image_size, rows=len(paths))
    folder = cache_dir_for(dataset, image_size, root)
    source = expected_source(dataset, image_size, paths)
    problems = ["rebuild asked"] if rebuild else cache_problems(folder, source, workers)
    if not problems:
        return _open(folder, Path(dataset.root))
    # One builder at a time (parallel workers on one machine share caches); the others wait, then reuse it.
    with _build_lock(folder):
        problems = ["rebuild asked"] if rebuild else cache_problems(folder, source, workers)
        if problems:
            if folder.exists() and not rebuild:
                print(f"rebuilding image cache: {problems[0]}", file=sys.stderr, flush=True)
            _remove_stale_staging(folder)
            build_cache(folder, paths, source, image_size, workers, progress)
            problems = cache_problems(folder, source, workers)
            if problems:
                raise CacheError(problems[0])
        return _open(folder, Path(dataset.root))


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """The exclusive lock of one cache folder's builders; a cache root without write access is one line."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder.parent / f".{folder.name}.lock", os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError as err:
        raise CacheError(f"{folder}: the cache must be (re)built but {folder.parent} is not writable "
                         f"({err.strerror or err}); set ${CACHE_ENV} to a writable folder") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _remove_stale_staging(folder: Path) -> None:
    """Delete staging and retired folders of ``folder`` left by a killed builder; the caller holds the
    build lock, so no live builder of this folder owns any of them."""
    for leftover in folder.parent.glob(f".{folder.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _progress(total: int, enabled: bool, description: str):
    if enabled and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
    return None


def build_cache(folder: Path, paths: Sequence[str], source: dict, image_size: tuple[int, int], workers: int,
                progress: bool = True) -> None:
    """Decode and resize ``paths`` into a new cache at ``folder`` (threads: Pillow releases the GIL)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_input_size(*image_size, rows=len(paths))
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        shape = (len(paths), *image_size, 3)
        crcs = _write_pixels(staging / ARRAY_FILE, folder, paths, shape, workers, source["dataset"], progress)
        root = Path(source["dataset_root"])
        (staging / INDEX_FILE).write_text(json.dumps({relative_to_root(path, root): row for row, path in enumerate(paths)}))
        manifest = build_manifest(source, shape, (staging / ARRAY_FILE).stat().st_size, crcs,
                                  sha256_of(staging / INDEX_FILE))
        (staging / MANIFEST_FILE).write_text(manifest_text(manifest))
        _replace_folder(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_pixels(path: Path, folder: Path, paths: Sequence[str], shape: tuple[int, ...], workers: int,
                  dataset: str, progress: bool) -> list[int]:
    """Decode every image into a new memory-mapped array at ``path``; returns its chunks' CRC32s. The map
    is closed on return, before the staging folder is renamed."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    _reserve(path, folder)
    resize = T.Resize(shape[1:3], interpolation=T.InterpolationMode.BILINEAR)
    bar = _progress(len(paths), progress, f"caching {dataset} at {shape[1]}x{shape[2]}")

    def decode(row: int) -> None:
        array[row] = np.asarray(resize(read_image(paths[row])), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        if bar is None:
            print(f"caching {len(paths)} images of {dataset} at {shape[1]}x{shape[2]} in {folder}", file=sys.stderr, flush=True)
            list(pool.map(decode, range(len(paths))))
        else:
            with bar:
                task = bar.add_task("images", total=len(paths))
                for _ in pool.map(decode, range(len(paths))):
                    bar.advance(task)
    array.flush()
    return chunk_crc32s(array, workers)


def _reserve(path: Path, folder: Path) -> None:
    """Allocate the memory-mapped file's blocks now: writing through a map past the free space is a
    SIGBUS, not an error, so a full file system must be found before the first pixel is written."""
    size = path.stat().st_size
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as err:
        free = shutil.disk_usage(path.parent).free
        raise CacheSpaceError(f"{folder}: the cache needs {size} bytes in {folder.parent}, {free} are free "
                              f"({err.strerror or err}); free space or set ${CACHE_ENV} elsewhere") from None
    finally:
        os.close(descriptor)


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move ``staging`` to ``folder``; an older ``folder`` is renamed away first, then deleted."""
    if folder.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, retired / "cache")
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, folder)


def clear_caches(root: Path | None = None, dataset: str | None = None) -> list[Path]:
    """Delete every cache under ``root`` (or only those of ``dataset``), with staging leftovers and lock
    files; returns the cache folders deleted (hidden leftovers are not listed)."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        hidden = path.name.startswith(".")  # a staging folder, a retired cache or a lock file
        if dataset is not None and not path.name.lstrip(".").startswith(f"{dataset}-"):
            continue
        if path.is_dir() and (hidden or (path / MANIFEST_FILE).exists()):
            shutil.rmtree(path, ignore_errors=True)
            if not hidden:
                removed.append(path)
        elif hidden and path.name.endswith(".lock"):
            path.unlink(missing_ok=True)
    return removed


def list_caches(root: Path | None = None) -> list[tuple[Path, dict | None]]:
    """Every cache folder under ``root`` with its manifest (None when unreadable)."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        try:
            found.append((folder, json.loads((folder / MANIFEST_FILE).read_text())))
        except (OSError, ValueError):
            found.append((folder, None))
    return found

