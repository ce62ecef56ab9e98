"""Damaged and hostile data, caches and configs through the real command line (issue 24): exit 2, one
stderr line naming the file, no traceback, and every input left byte for byte as it was.

Most cases use the in-process ``cli`` fixture; ``php_run`` runs the installed console script as a
subprocess for the cases where the process boundary matters (a signal, a real mount).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from php_runner.store.registry import Registry

from php_runner.data import write_synthetic

DATASET = "RSTPReid"
ANNOTATION = "data_captions.json"
SIZE = "48x24"
STATUS_LINES = ("caching ", "rebuilding image cache: ")


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (lock files excluded: flock leaves them by design)."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.name.endswith(".lock"):
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_refused(code: int, stderr: str, expected: str) -> None:
    """Exit 2 and exactly one error line naming ``expected``; besides it only the cache's status lines."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(("error: ", "problem: "))]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and expected in errors[0], stderr
    assert all(line in errors or line.startswith(STATUS_LINES) for line in lines), stderr


def php_run(*args, env: dict | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "php_runner", *map(str, args)], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def data(tmp_path) -> Path:
    """A fresh small RSTPReid (2 train ids) the test may damage."""
    root = tmp_path / "data"
    write_synthetic(root, DATASET, num_ids=2, seed=3)
    return root


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PHP_RUN_CACHE", str(root))
    return root


def annotation(data: Path) -> Path:
    return data / DATASET / ANNOTATION


def first_image(data: Path) -> Path:
    entry = json.loads(annotation(data).read_text())[0]
    return data / DATASET / "imgs" / entry["img_path"]


def data_check(cli, data):
    return cli("data", "check", "--data-root", data, "--dataset", DATASET)


def cache_build(cli, data, size=SIZE, *extra):
    return cli("cache", "build", "--data-root", data, "--dataset", DATASET, "--image-size", size, "--workers", 1,
               *extra)


def cache_check(cli, data, size=SIZE):
    return cli("cache", "check", "--data-root", data, "--dataset", DATASET, "--image-size", size, "--workers", 1)


# ---- item 2: annotation JSON nested very deep ----------------------------------------------------

def test_deeply_nested_annotation_is_one_line_in_data_check_and_cache_build(cli, data, cache_root):
    annotation(data).write_text("[" * 100_000 + "]" * 100_000)
    before = snapshot(data)
    for command in (data_check, cache_build):
        code, _, err = command(cli, data)
        assert_refused(code, err, f"{annotation(data)}: JSON nested 100000 deep, over the limit of 64")
    assert snapshot(data) == before


# ---- items 3 and 4: decompression bomb, truncated and random-byte images ---------------------------

def write_bomb(path: Path) -> None:
    """A PNG whose header claims 20000x10000 pixels: a few hundred bytes on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    header = (20000).to_bytes(4, "big") + (10000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "bomb": (write_bomb, "pixels, over the limit of 89478485"),
    "truncated": (truncate, "cannot be read as an image"),
    "random-bytes": (lambda path: path.write_bytes(os.urandom(300)), "cannot be read as an image"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_image_is_reported_by_data_check_and_refused_by_cache_build(damage, cli, data, cache_root):
    damage_image, expected = DAMAGES[damage]
    image = first_image(data)
    damage_image(image)
    before = snapshot(data)
    code, _, err = data_check(cli, data)
    assert_refused(code, err, f"{image}: ")
    assert expected in err
    code, _, err = cache_build(cli, data)
    assert_refused(code, err, f"{image}: ")
    assert snapshot(data) == before and not list(cache_root.glob("RSTPReid-*"))  # no half-built cache


def test_pixel_limit_is_overridable(cli, data, cache_root, monkeypatch):
    image = first_image(data)
    write_bomb(image)
    monkeypatch.setenv("PHP_RUN_MAX_IMAGE_PIXELS", "1000")
    code, _, err = data_check(cli, data)
    assert code == 2 and err.count("over the limit of 1000") >= 2  # every image, the good ones included


# ---- item 6: a person id of 10^12 --------------------------------------------------------------------

def test_huge_person_id_is_refused_before_any_allocation(cli, data, cache_root):
    entries = json.loads(annotation(data).read_text())
    train = next(index for index, entry in enumerate(entries) if entry["split"] == "train")
    entries[train]["id"] = 10**12
    annotation(data).write_text(json.dumps(entries))
    before = snapshot(data)
    for command in (data_check, cache_build):
        code, _, err = command(cli, data)
        assert_refused(code, err, f"{annotation(data)}: entry {train}: field 'id' is outside 0..10000000")
    assert snapshot(data) == before


# ---- item 7: index.json covered by the manifest; exact sizes -----------------------------------------

@pytest.fixture
def built(cli, data, cache_root) -> Path:
    code, _, err = cache_build(cli, data)
    assert code == 0, err
    (folder,) = cache_root.glob("RSTPReid-*")
    return folder


def swap_two_rows(folder: Path) -> None:
    index = json.loads((folder / "index.json").read_text())
    first, second = list(index)[:2]
    index[first], index[second] = index[second], index[first]
    (folder / "index.json").write_text(json.dumps(index))


CACHE_DAMAGES = {
    "swapped-index-rows": (swap_two_rows, "index.json: sha256 differs"),
    "garbage-index": (lambda folder: (folder / "index.json").write_bytes(b"\x00garbage{"), "index.json: sha256"),
    "array-extra-bytes": (lambda folder: (folder / "images.npy").open("ab").write(b"\0" * 16), "images.npy: "),
    "index-extra-bytes": (lambda folder: (folder / "index.json").open("ab").write(b" "), "index.json: "),
    "array-truncated": (lambda folder: os.truncate(folder / "images.npy", 200), "images.npy: "),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGES))
def test_damaged_cache_fails_check_and_is_rebuilt(damage, cli, data, built):
    damage_cache, expected = CACHE_DAMAGES[damage]
    sound = snapshot(built)
    damage_cache(built)
    damaged = snapshot(built)
    code, _, err = cache_check(cli, data)
    assert code == 2 and "Traceback" not in err and expected in err, err
    assert snapshot(built) == damaged  # checking changes nothing
    code, _, err = cache_build(cli, data)
    assert code == 0 and "rebuilding image cache" in err, err
    assert snapshot(built) == sound  # rebuilt byte for byte
    assert cache_check(cli, data)[0] == 0


def test_manifest_records_the_image_size(cli, data, built):
    """Item 20: a cache built at one size is stale for another, even in the same folder."""
    from php_runner.data import read_dataset
    from php_runner.data.cache import check_cache

    problems = check_cache(built, read_dataset(data, DATASET), (24, 12), workers=1)
    assert problems and "image_size" in problems[0]


# ---- items 8, 9 and 11: read-only and full file systems, stale staging --------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a 2 MiB tmpfs (root only); yields (folder, remount(options))."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the read-only and full-disk cases are not tried")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)

    yield folder, remount
    subprocess.run(["umount", str(folder)], check=True)


def test_sound_cache_on_a_read_only_mount_is_read_and_a_stale_one_is_one_line(cli, data, tmpfs, monkeypatch):
    folder, remount = tmpfs
    monkeypatch.setenv("PHP_RUN_CACHE", str(folder))
    assert cache_build(cli, data)[0] == 0
    for lock in folder.glob(".*.lock"):
        lock.unlink()
    remount("ro")
    before = snapshot(folder)
    code, out, err = cache_build(cli, data)
    assert code == 0 and "verified" in out, err
    code, _, err = cache_build(cli, data, "24x12")  # absent: must be built, cannot be
    assert_refused(code, err, f"{folder} is not writable")
    assert snapshot(folder) == before


def test_cache_build_onto_a_full_file_system_is_one_line_with_the_bytes_needed(cli, data, tmpfs, monkeypatch):
    folder, _ = tmpfs
    monkeypatch.setenv("PHP_RUN_CACHE", str(folder))
    before = snapshot(data)
    code, _, err = php_run("cache", "build", "--data-root", data, "--dataset", DATASET, "--image-size", "512x256",
                           "--workers", 1, env={"PHP_RUN_CACHE": str(folder)})
    assert_refused(code, err, "the cache needs")  # a SIGBUS would be code -7
    assert f"bytes in {folder}" in err
    assert snapshot(data) == before and not [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_staging_left_by_a_killed_build_is_removed_by_the_next_build(cli, data, built, cache_root):
    leftovers = [cache_root / f".{built.name}.k1l3d", cache_root / f".{built.name}.old.x"]
    for leftover in leftovers:
        (leftover / "cache").mkdir(parents=True)
        (leftover / "cache" / "images.npy").write_bytes(b"\0" * 64)
    code, _, err = cache_build(cli, data, SIZE, "--force")
    assert code == 0, err
    assert not any(leftover.exists() for leftover in leftovers)


# ---- item 13: an image size no model or memory can take ---------------------------------------------

def test_huge_image_size_is_refused_before_allocating(cli, data, cache_root):
    before = snapshot(data)
    for command in (cache_build, cache_check):
        code, _, err = command(cli, data, "100000x100000")
        assert_refused(code, err, "image size 100000x100000: 10000000000 pixels per image exceeds the limit")
    assert "bytes" in err and snapshot(data) == before and not cache_root.exists()


# ---- item 5: configs.yaml nested very deep -----------------------------------------------------------

@pytest.mark.parametrize("body", ["a: " + "[" * 50_000 + "]" * 50_000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 400)),
                                  "a: " + "[" * 100 + "]" * 100], ids=["flow-50000", "block-400", "flow-100"])
def test_deeply_nested_configs_yaml_is_one_line(body, cli, data, tmp_path):
    config = tmp_path / "configs.yaml"
    config.write_text(body)
    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes(b"unused")
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (config, checkpoint)}
    code, _, err = cli("evaluate", "--checkpoint", checkpoint, "--config", config, "--data-root", data,
                       "--dataset", DATASET)
    assert_refused(code, err, f"{config}: YAML nested")
    assert {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (config, checkpoint)} == before


# ---- training through `php-run run` ------------------------------------------------------------------

@pytest.fixture
def one_run_spec(tmp_path, spec_dir) -> Path:
    specs = tmp_path / "specs"
    shutil.copytree(spec_dir, specs)
    spec = specs / "one.toml"
    spec.write_text('extends = "base"\ndatasets = ["RSTPReid"]\nseeds = [1]\n')
    return spec


def test_run_refuses_a_deep_annotation_and_a_huge_id_in_one_line(cli, data, cache_root, one_run_spec, tmp_path):
    """The preflight reads the annotation, so the run is refused (exit 2) before anything is recorded."""
    text = annotation(data).read_text()
    for body, expected in (("[" * 5000 + "]" * 5000, "JSON nested 5000 deep, over the limit of 64"),
                           (text.replace('"id": 0', '"id": 1000000000000', 1), "field 'id' is outside")):
        annotation(data).write_text(body)
        before = snapshot(data)
        code, out, err = cli("run", one_run_spec, "--preset", "tiny", "--data-root", data, "--db",
                             f"sqlite:///{tmp_path / 'r.db'}")
        assert code == 2 and "Traceback" not in out + err, err
        assert f"{annotation(data)}: " in err and expected in err and snapshot(data) == before
        assert not Registry(f"sqlite:///{tmp_path / 'r.db'}", read_only=True).list_runs()  # nothing recorded


def test_run_refuses_a_truncated_image_by_path_instead_of_training_on_grey_rows(data, cache_root, one_run_spec,
                                                                                 tmp_path):
    """The run is recorded first (preflight reads the annotation only), then fails naming the image."""
    image = first_image(data)
    truncate(image)
    code, out, err = php_run("run", one_run_spec, "--preset", "tiny", "--data-root", data, "--db",
                             f"sqlite:///{tmp_path / 'r.db'}", env={"PHP_RUN_CACHE": str(cache_root)}, cwd=tmp_path)
    assert code != 0 and "Traceback" not in out + err
    assert f"{image}: cannot be read as an image (image file is truncated" in out + err
