"""What a sound image cache is: its file names, the manifest a build writes, and every check a reader
relies on (:mod:`php_runner.data.cache` builds and opens caches; see its docstring for the layout).

The manifest is checked to the byte: a cache is sound only when ``manifest.json`` is exactly what a build
would write for the array, index and dataset found, so no edit of any field goes unnoticed, read or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torchvision

from php_runner.data.datasets import LAYOUTS, PedesDataset
from php_runner.data.limits import check_input_size
from php_runner.errors import InputError

FORMAT_VERSION = 1
RESIZE_RULE = "PIL Image.convert('RGB') then torchvision Resize((H, W), BILINEAR, antialias) on the PIL image"
ROWS_PER_CHUNK = 256
ARRAY_FILE, INDEX_FILE, MANIFEST_FILE = "images.npy", "index.json", "manifest.json"


class CacheError(InputError):
    """A cache folder that cannot be used (missing, stale, truncated or corrupt)."""


def dataset_images(dataset: PedesDataset) -> list[str]:
    """Every distinct image path of the dataset (train, val, test), in a fixed order."""
    paths: dict[str, None] = {}
    for item in dataset.train:
        paths.setdefault(item.img_path)
    for split in (dataset.val, dataset.test):
        if split is not None:
            for path in split.img_paths:
                paths.setdefault(path)
    return sorted(paths)


def annotation_file(dataset: PedesDataset) -> Path:
    layout = LAYOUTS[dataset.name]
    for name in layout.annotation_files:
        if (Path(dataset.root) / name).is_file():
            return Path(dataset.root) / name
    raise CacheError(f"{dataset.root}: no annotation file ({' or '.join(layout.annotation_files)}) to key the cache on")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_to_root(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def images_fingerprint(paths: Sequence[str], root: Path) -> str:
    """sha256 over (relative path, size, mtime) of every image: a replaced image makes the cache stale."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{relative_to_root(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def expected_source(dataset: PedesDataset, image_size: tuple[int, int], paths: Sequence[str]) -> dict:
    """The manifest fields the current dataset and settings require (everything the pixels depend on)."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.name,
        "dataset_root": str(Path(dataset.root).resolve()),
        "annotation_sha256": sha256_of(annotation_file(dataset)),
        "images_fingerprint": images_fingerprint(paths, Path(dataset.root)),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "resize_rule": RESIZE_RULE,
        "versions": {"pillow": PIL.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__},
        "rows": len(paths),
    }


def chunk_crc32s(array: np.ndarray, workers: int) -> list[int]:
    starts = range(0, max(len(array), 1), ROWS_PER_CHUNK)
    # zlib releases the GIL on large buffers, so threads checksum chunks in parallel.
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        return list(pool.map(lambda start: zlib.crc32(memoryview(np.ascontiguousarray(array[start:start + ROWS_PER_CHUNK])).cast("B")), starts))


def build_manifest(source: dict, shape: Sequence[int], nbytes: int, crcs: list[int], index_sha256: str) -> dict:
    """The manifest a build writes for an array of ``shape`` (``nbytes`` on disk) and its index."""
    return {
        "source": source,
        "array": {"file": ARRAY_FILE, "shape": [int(n) for n in shape], "dtype": "uint8", "bytes": int(nbytes),
                  "rows_per_chunk": ROWS_PER_CHUNK, "chunk_crc32": crcs, "index_sha256": index_sha256},
    }


def manifest_text(manifest: dict) -> str:
    """The bytes of ``manifest.json`` (one serialisation, so a reader can demand exactly these)."""
    return json.dumps(manifest, indent=1)


def cache_problems(folder: Path, source: dict | None, workers: int) -> list[str]:
    """Why the cache in ``folder`` may not be used (empty: it is sound and matches ``source``)."""
    manifest_path, array_path = folder / MANIFEST_FILE, folder / ARRAY_FILE
    if not manifest_path.is_file():
        return [f"{folder}: no cache here"]
    try:
        text = manifest_path.read_text()
        manifest = json.loads(text)
        recorded = manifest["source"]
        shape, nbytes, crcs = manifest["array"]["shape"], manifest["array"]["bytes"], manifest["array"]["chunk_crc32"]
        if not (isinstance(recorded, dict) and _is_ints(shape) and len(shape) == 4 and _is_ints([nbytes])
                and _is_ints(crcs)):
            raise TypeError("source, array shape, bytes or chunk_crc32 of the wrong type")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{manifest_path}: unreadable manifest ({err})"]
    if source is not None:
        stale = sorted(key for key in set(source) | set(recorded) if source.get(key) != recorded.get(key))
        if stale:  # it will be rebuilt: no need to read the array
            return [f"{folder}: stale, manifest differs in {', '.join(stale)}"]
    if not array_path.is_file() or not (folder / INDEX_FILE).is_file():
        return [f"{folder}: {ARRAY_FILE} or {INDEX_FILE} missing"]
    index_problem = _index_problem(folder, manifest, shape[0])
    if index_problem:
        return [index_problem]
    if array_path.stat().st_size != nbytes:
        return [f"{array_path}: {array_path.stat().st_size} bytes, the manifest says {nbytes} (truncated?)"]
    return _array_problems(folder, text, manifest, workers)


def _array_problems(folder: Path, text: str, manifest: dict, workers: int) -> list[str]:
    """The array against the manifest (shape, dtype, every chunk's CRC32), then the manifest against the
    one a build would write for what was found (any other edited field)."""
    array_path, shape, crcs = folder / ARRAY_FILE, manifest["array"]["shape"], manifest["array"]["chunk_crc32"]
    try:
        array = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError) as err:
        return [f"{array_path}: unreadable ({err})"]
    if list(array.shape) != list(shape) or array.dtype != np.uint8:
        return [f"{array_path}: shape {list(array.shape)} {array.dtype}, the manifest says {shape} uint8"]
    found = chunk_crc32s(array, workers)
    bad = [index for index, (got, want) in enumerate(zip(found, crcs)) if got != want]
    if len(crcs) != len(found):
        bad.append(-1)
    if bad:
        first_row = max(bad[0], 0) * ROWS_PER_CHUNK
        return [f"{array_path}: {len(bad)} corrupt chunk(s) of {ROWS_PER_CHUNK} rows (first at row {first_row})"]
    rebuilt = build_manifest(manifest["source"], array.shape, array_path.stat().st_size, found,
                             manifest["array"].get("index_sha256"))
    if text != manifest_text(rebuilt):
        return [f"{folder / MANIFEST_FILE}: differs from the manifest a build writes for these files (edited or damaged)"]
    return []


def _is_ints(values: object) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _index_problem(folder: Path, manifest: dict, rows: int) -> str | None:
    """Why ``index.json`` may not be trusted: its sha256 differs from the manifest's, or it is not a
    one-to-one map of paths to the rows ``0..rows-1``."""
    index_path = folder / INDEX_FILE
    if sha256_of(index_path) != manifest["array"].get("index_sha256"):
        return f"{index_path}: sha256 differs from the manifest's (modified or damaged)"
    try:
        index = json.loads(index_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{index_path}: unreadable ({err})"
    if not isinstance(index, dict) or not _is_ints(list(index.values())) or sorted(index.values()) != list(range(rows)):
        return f"{index_path}: not a map of image paths to the rows 0..{rows - 1}"
    return None


def check_cache(folder: Path, dataset: PedesDataset | None = None, image_size: tuple[int, int] | None = None,
                workers: int | None = None) -> list[str]:
    """Problems of the cache in ``folder``; with a dataset and size, also whether it is stale for them."""
    source = None
    if dataset is not None and image_size is not None:
        check_input_size(*image_size)
        source = expected_source(dataset, image_size, dataset_images(dataset))
    return cache_problems(Path(folder), source, workers or os.cpu_count() or 1)


