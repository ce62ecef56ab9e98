"""The image cache: exact pixels of the PIL pipeline, manifest keys, and stale/truncated/corrupt caches rebuilt."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from php_runner.data import read_dataset, write_synthetic
from php_runner.data.cache import (
    ARRAY_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    CacheError,
    cache_dir_for,
    cache_root,
    check_cache,
    clear_caches,
    dataset_images,
    open_cache,
)
from php_runner.data.loaders import ImageSet, read_image
from php_runner.data.transforms import build_transform

SIZE = (48, 24)


@pytest.fixture
def data(tmp_path):
    """A fresh synthetic CUHK-PEDES the test may modify, and an empty cache root."""
    write_synthetic(tmp_path / "data", "CUHK-PEDES", num_ids=3, seed=0)
    return read_dataset(tmp_path / "data", "CUHK-PEDES"), tmp_path / "cache"


def build(dataset, root, size=SIZE):
    return open_cache(dataset, size, root=root, workers=2, progress=False)


def test_cached_test_pipeline_gives_the_pil_test_tensors(data):
    dataset, root = data
    cache = build(dataset, root)
    split = dataset.test
    transform = build_transform(SIZE, train=False)
    cached = ImageSet(split.image_pids, split.img_paths, transform, cache=cache)
    files = ImageSet(split.image_pids, split.img_paths, transform)
    assert len(cached) == len(files) > 0
    for index in range(len(files)):
        assert cached[index][0] == files[index][0]
        assert torch.equal(cached[index][1], files[index][1])  # bit for bit


def test_every_image_cached_once_at_the_resize_bytes(data):
    dataset, root = data
    cache = build(dataset, root)
    paths = dataset_images(dataset)
    assert cache.array.shape == (len(paths), *SIZE, 3) and len(set(paths)) == len(paths)
    resize = build_transform(SIZE).transforms[0]
    for path in paths[:5]:
        expected = np.asarray(resize(read_image(path)))
        assert np.array_equal(cache.pixels(cache.rows_of([path]))[0].numpy(), expected)


def test_sound_cache_is_reused_not_rebuilt(data):
    dataset, root = data
    first = build(dataset, root)
    stamp = os.stat(first.folder / ARRAY_FILE).st_mtime_ns
    second = build(dataset, root)
    assert second.folder == first.folder and os.stat(second.folder / ARRAY_FILE).st_mtime_ns == stamp
    assert check_cache(first.folder, dataset, SIZE) == []


def _rebuilt(dataset, root, damage):
    cache = build(dataset, root)
    folder, reference = cache.folder, np.array(cache.array)
    del cache
    damage(folder)
    assert check_cache(folder, dataset, SIZE)  # the damage is detected
    rebuilt = build(dataset, root)
    assert check_cache(folder, dataset, SIZE) == []
    return reference, np.array(rebuilt.array)


def test_truncated_cache_detected_and_rebuilt(data):
    dataset, root = data

    def truncate(folder):
        with open(folder / ARRAY_FILE, "r+b") as handle:
            handle.truncate(os.path.getsize(folder / ARRAY_FILE) - 100)

    reference, rebuilt = _rebuilt(dataset, root, truncate)
    assert np.array_equal(reference, rebuilt)


def test_corrupt_cache_detected_and_rebuilt(data):
    dataset, root = data

    def flip_a_byte(folder):
        with open(folder / ARRAY_FILE, "r+b") as handle:
            handle.seek(os.path.getsize(folder / ARRAY_FILE) // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0xFF]))

    reference, rebuilt = _rebuilt(dataset, root, flip_a_byte)
    assert np.array_equal(reference, rebuilt)


def test_missing_index_or_bad_manifest_detected(data):
    dataset, root = data
    _rebuilt(dataset, root, lambda folder: (folder / INDEX_FILE).unlink())
    _rebuilt(dataset, root, lambda folder: (folder / MANIFEST_FILE).write_text("{not json"))


def test_stale_cache_rebuilt_when_annotation_or_images_change(data):
    dataset, root = data
    cache = build(dataset, root)
    folder = cache.folder
    annotation = dataset.root / "reid_raw.json"
    entries = json.loads(annotation.read_text())
    entries[0]["captions"] = ["a changed caption."] + entries[0]["captions"][1:]
    annotation.write_text(json.dumps(entries))
    problems = check_cache(folder, dataset, SIZE)
    assert problems and "annotation_sha256" in problems[0]
    build(dataset, root)
    assert check_cache(folder, dataset, SIZE) == []

    # A replaced image (same annotation) makes the cache stale too, and the new pixels are cached.
    path = dataset_images(dataset)[0]
    shutil.copy(dataset_images(dataset)[1], path)
    os.utime(path, ns=(1, 1))
    assert "images_fingerprint" in check_cache(folder, dataset, SIZE)[0]
    rebuilt = build(dataset, root)
    expected = np.asarray(build_transform(SIZE).transforms[0](read_image(path)))
    assert np.array_equal(rebuilt.pixels(rebuilt.rows_of([path]))[0].numpy(), expected)


def test_another_dataset_or_size_never_used(data, tmp_path):
    dataset, root = data
    cache = build(dataset, root)
    other_size = build(dataset, root, (32, 16))
    assert other_size.folder != cache.folder and other_size.array.shape[1:3] == (32, 16)
    write_synthetic(tmp_path / "other", "CUHK-PEDES", num_ids=2, seed=1)
    other = read_dataset(tmp_path / "other", "CUHK-PEDES")
    assert cache_dir_for(other, SIZE, root) != cache.folder
    # Even a cache copied into the other dataset's place is refused as stale, then rebuilt.
    shutil.copytree(cache.folder, cache_dir_for(other, SIZE, root))
    assert "dataset_root" in check_cache(cache_dir_for(other, SIZE, root), other, SIZE)[0]
    reopened = build(other, root)
    assert reopened.array.shape[0] == len(dataset_images(other))
    with pytest.raises(CacheError, match="not in the cache"):
        cache.rows_of([dataset_images(other)[0]])


def test_clear_and_default_location(data, monkeypatch, tmp_path):
    dataset, root = data
    build(dataset, root)
    assert [folder.name.split("-")[0] for folder in clear_caches(root)] == ["CUHK"]
    assert not any(root.iterdir())
    monkeypatch.setenv("PHP_RUN_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_an_index_that_is_not_one_to_one_is_refused_even_with_a_matching_hash(data):
    """Issue 24 item 7: two paths on one row (and a row left out) is refused though the manifest agrees."""
    import hashlib

    cache = build(*data)
    index = json.loads((cache.folder / "index.json").read_text())
    first, second = list(index)[:2]
    index[second] = index[first]
    text = json.dumps(index).encode()
    (cache.folder / "index.json").write_bytes(text)
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    manifest["array"]["index_sha256"] = hashlib.sha256(text).hexdigest()
    (cache.folder / "manifest.json").write_text(json.dumps(manifest))
    problems = check_cache(cache.folder, workers=1)
    assert problems and "not a map of image paths to the rows" in problems[0]


def test_every_changed_byte_of_the_manifest_is_found(data):
    """The CI fuzz case of issue 24: a bit flipped in a field no reader uses (``file``, ``dtype``,
    ``rows_per_chunk``, formatting) went unnoticed. Flip each byte's low bit in turn: always a problem."""
    dataset, root = data
    cache = build(dataset, root)
    path = cache.folder / "manifest.json"
    sound = path.read_bytes()
    missed = []
    for at in range(len(sound)):
        path.write_bytes(sound[:at] + bytes([sound[at] ^ 1]) + sound[at + 1:])
        if not check_cache(cache.folder, dataset, SIZE):
            missed.append(sound[max(at - 20, 0):at + 5].decode(errors="replace"))
    path.write_bytes(sound)
    assert check_cache(cache.folder, dataset, SIZE) == []
    assert missed == []
