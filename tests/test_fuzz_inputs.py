"""Property-based fuzzing of damaged inputs through the real CLI (issue 24): annotation files, images,
cache files and configs.yaml. Every generated case must end in exit 0 or a clean exit 2 (one error
line, no traceback; the in-process runner re-raises any exception) and leave its inputs unchanged.

``HYPOTHESIS_PROFILE=local`` runs many more cases than the CI default (tests/fuzz_profiles.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest
from fuzz_damage import BYTE_DAMAGES, assert_clean, damage_bytes, snapshot
from fuzz_profiles import load
from hypothesis import event, given
from hypothesis import strategies as st

from php_runner.data import write_synthetic

PROFILE = load()
DATASET, ANNOTATION = "RSTPReid", "data_captions.json"
SIZE = "32x16"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_data")
    write_synthetic(root, DATASET, num_ids=2, seed=5)
    return root


def fresh_copy(pristine: Path, folder: Path) -> Path:
    data = folder / "data"
    shutil.copytree(pristine, data)
    return data


# ---- annotation files ----------------------------------------------------------------------------

FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15), st.floats(allow_nan=True),
                         st.text(max_size=8), st.lists(st.integers(), max_size=2), st.just({"x": [1]}))


def edit_entries(text: str, edit: tuple) -> str:
    entries = json.loads(text)
    kind = edit[0]
    if kind == "field":
        _, index, field, value = edit
        entries[index % len(entries)][field] = value
    elif kind == "deep":
        entries[edit[1] % len(entries)]["captions"] = json.loads("[" * 10 + "]" * 10) if edit[2] < 64 else None
        return json.dumps(entries)[:-1] + ", " + "[" * edit[2] + "]" * edit[2] + "]"
    elif kind == "drop":
        del entries[edit[1] % len(entries)][edit[2]]
    return json.dumps(entries)


ANNOTATION_EDITS = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 100), st.sampled_from(["id", "split", "img_path", "captions"]),
              FIELD_VALUES),
    st.tuples(st.just("deep"), st.integers(0, 100), st.integers(1, 20_000)),
    st.tuples(st.just("drop"), st.integers(0, 100), st.sampled_from(["id", "split", "img_path", "captions"])),
)


@given(edit=st.one_of(ANNOTATION_EDITS.map(lambda e: ("edit", e)), BYTE_DAMAGES.map(lambda d: ("bytes", d))))
def test_damaged_annotation_file(cli, pristine, edit):
    with tempfile.TemporaryDirectory() as folder:
        data = fresh_copy(pristine, Path(folder))
        path = data / DATASET / ANNOTATION
        if edit[0] == "edit":
            path.write_text(edit_entries(path.read_text(), edit[1]))
            event(f"edit {edit[1][0]}")
        else:
            damage_bytes(path, edit[1])
        before = snapshot(data)
        code, _, err = cli("data", "check", "--data-root", data, "--dataset", DATASET)
        assert_clean(code, err)
        assert snapshot(data) == before


# ---- images ------------------------------------------------------------------------------------------

def bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


IMAGE_DAMAGES = st.one_of(BYTE_DAMAGES, st.tuples(st.just("bomb"), st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)))


@given(which=st.integers(0, 1000), damage=IMAGE_DAMAGES)
def test_damaged_image(cli, pristine, monkeypatch, which, damage):
    with tempfile.TemporaryDirectory() as folder:
        data = fresh_copy(pristine, Path(folder))
        monkeypatch.setenv("PHP_RUN_CACHE", str(Path(folder) / "cache"))
        images = sorted((data / DATASET / "imgs").rglob("*.jpg"))
        image = images[which % len(images)]
        if damage[0] == "bomb":
            image.write_bytes(bomb(damage[1], damage[2]))
            event("damage bomb")
        else:
            damage_bytes(image, damage)
        before = snapshot(data)
        for command in ("data", "cache"):
            args = (["data", "check"] if command == "data" else
                    ["cache", "build", "--image-size", SIZE, "--workers", "1"])
            code, _, err = cli(*args, "--data-root", data, "--dataset", DATASET)
            assert_clean(code, err)
        assert snapshot(data) == before


# ---- cache files -------------------------------------------------------------------------------------

@given(target=st.sampled_from(["index.json", "manifest.json", "images.npy"]), damage=BYTE_DAMAGES)
def test_damaged_cache_is_refused_by_check_and_rebuilt(cli, pristine, monkeypatch, target, damage):
    with tempfile.TemporaryDirectory() as folder:
        data = fresh_copy(pristine, Path(folder))
        monkeypatch.setenv("PHP_RUN_CACHE", str(Path(folder) / "cache"))
        args = ("--data-root", data, "--dataset", DATASET, "--image-size", SIZE, "--workers", "1")
        assert cli("cache", "build", *args)[0] == 0
        (cache,) = (Path(folder) / "cache").glob(f"{DATASET}-*")
        sound = snapshot(cache)
        damage_bytes(cache / target, damage)
        changed = snapshot(cache) != sound
        event(f"cache file changed: {changed}")
        code, _, err = cli("cache", "check", *args)
        assert_clean(code, err)
        assert code == (2 if changed else 0), err  # every change to a file a reader trusts is found
        code, _, err = cli("cache", "build", *args)
        assert_clean(code, err)
        assert code == 0 and snapshot(cache) == sound  # rebuilt to the same bytes


# ---- configs.yaml ------------------------------------------------------------------------------------

YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=6))
YAML_KEYS = st.sampled_from(["lr", "cnum", "topk", "temperature", "loss_names", "dataset_name", "img_size",
                             "batch_size", "num_epoch", "x"])


@given(body=st.one_of(
    st.dictionaries(YAML_KEYS, st.recursive(YAML_SCALARS, lambda c: st.lists(c, max_size=3), max_leaves=8),
                    max_size=5).map(lambda d: json.dumps(d)),
    st.integers(1, 30_000).map(lambda n: "a: " + "[" * n + "]" * n),
    st.integers(1, 600).map(lambda n: "a:\n" + "".join(" " * i + "- \n" for i in range(1, n))),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.just("a: &x [1, 2]\nb: [*x, *x, *x]\nlr: !!python/object/apply:os.system ['true']\n"),
))
def test_damaged_configs_yaml(cli, pristine, body):
    with tempfile.TemporaryDirectory() as folder:
        config, checkpoint = Path(folder) / "configs.yaml", Path(folder) / "best.pth"
        config.write_text(body, encoding="utf-8", errors="surrogateescape")
        checkpoint.write_bytes(b"not a checkpoint")
        before = snapshot(Path(folder))
        code, _, err = cli("evaluate", "--checkpoint", checkpoint, "--config", config, "--data-root", pristine,
                           "--dataset", DATASET)
        assert_clean(code, err)
        assert code == 2 and snapshot(Path(folder)) == before
