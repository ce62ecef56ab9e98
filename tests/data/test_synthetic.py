"""Synthetic datasets: official layouts, default sizes, determinism per seed, distinct and described appearances."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from php_runner.data.datasets import DATASET_NAMES, DatasetError, dataset_statistics, read_dataset
from php_runner.data.synthetic import (
    CLOTHING_COLOURS,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    Appearance,
    describe,
    draw_person,
    sample_appearances,
    split_sizes,
    write_synthetic,
)

ANNOTATIONS = {"CUHK-PEDES": "reid_raw.json", "ICFG-PEDES": "ICFG-PEDES.json", "RSTPReid": "data_captions.json"}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_all_writes_the_three_annotation_files(synthetic_root):
    for name, annotation in ANNOTATIONS.items():
        assert (synthetic_root / name / annotation).is_file()
        assert (synthetic_root / name / "imgs").is_dir()


def test_default_sizes(tmp_path):
    written = write_synthetic(tmp_path)
    assert written == [tmp_path / name / ANNOTATIONS[name] for name in DATASET_NAMES]
    stats = {name: {r["subset"]: (r["ids"], r["images"], r["captions"])
                    for r in dataset_statistics(read_dataset(tmp_path, name))} for name in DATASET_NAMES}
    assert stats["CUHK-PEDES"] == {"train": (100, 400, 800), "val": (25, 50, 100), "test": (50, 100, 200)}
    assert stats["RSTPReid"] == stats["CUHK-PEDES"]
    assert stats["ICFG-PEDES"] == {"train": (100, 400, 400), "val": (0, 0, 0), "test": (50, 100, 100)}


def test_split_sizes_follow_the_train_ids():
    assert split_sizes(40, "CUHK-PEDES") == {"train": 40, "val": 10, "test": 20}
    assert split_sizes(1, "RSTPReid") == {"train": 1, "val": 2, "test": 2}
    assert split_sizes(9, "ICFG-PEDES") == {"train": 9, "test": 5}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    write_synthetic(tmp_path / "a", "CUHK-PEDES", num_ids=3, seed=5)
    write_synthetic(tmp_path / "b", "CUHK-PEDES", num_ids=3, seed=5)
    write_synthetic(tmp_path / "c", "CUHK-PEDES", num_ids=3, seed=6)
    first, second, other = (files_of(tmp_path / x) for x in "abc")
    assert first == second
    assert first["CUHK-PEDES/reid_raw.json"] != other["CUHK-PEDES/reid_raw.json"]
    assert any(first[path] != other[path] for path in first if path.endswith(".jpg"))


def test_a_dataset_does_not_depend_on_the_others_being_written(tmp_path, synthetic_root):
    write_synthetic(tmp_path, "RSTPReid", num_ids=4, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["RSTPReid"]
    assert files_of(tmp_path / "RSTPReid") == files_of(synthetic_root / "RSTPReid")


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_layout_of_each_format(synthetic_root, name):
    entries = json.loads((synthetic_root / name / ANNOTATIONS[name]).read_text())
    path_field = "img_path" if name == "RSTPReid" else "file_path"
    assert all({"split", "id", "captions", path_field} <= set(e) for e in entries)
    assert all(len(e["captions"]) == (1 if name == "ICFG-PEDES" else 2) for e in entries)
    splits = [e["split"] for e in entries]
    expected_splits = ["train", "test"] if name == "ICFG-PEDES" else ["train", "val", "test"]
    assert list(dict.fromkeys(splits)) == expected_splits
    # Grouped by identity: ids never come back once the next one starts.
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids)
    assert ids[0] == (1 if name == "CUHK-PEDES" else 0)


def test_images_are_jpeg_of_the_documented_size(synthetic_root):
    from PIL import Image

    ds = read_dataset(synthetic_root, "ICFG-PEDES")
    with Image.open(ds.test.img_paths[0]) as image:
        assert image.format == "JPEG" and image.size == (IMAGE_WIDTH, IMAGE_HEIGHT) and image.mode == "RGB"


def test_appearances_are_distinct_and_exhaustible():
    appearances = sample_appearances(500, random.Random(1))
    assert len(set(appearances)) == 500
    with pytest.raises(DatasetError, match="num_ids"):
        sample_appearances(10**6, random.Random(1))


def test_captions_name_the_appearance_and_vary():
    appearance = Appearance(upper="purple", lower="orange", bag="backpack", hair="blond", shoes="white")
    rng = random.Random(0)
    captions = [describe(appearance, rng) for _ in range(30)]
    for caption in captions:
        words = caption.lower()
        assert "backpack" in words
        main_sentence = words.split(".")[0]
        assert "purple" in main_sentence and "orange" in main_sentence
        assert caption[0].isupper() and caption.endswith(".")
    assert sum("blond" in c for c in captions) > 5  # hair is mentioned in some captions
    assert len(set(captions)) == 30
    assert len({c.split(".")[0].split()[0] for c in captions}) > 2  # several sentence templates


def test_drawn_clothes_have_the_named_colours():
    rng = random.Random(0)
    for upper, lower in [("red", "blue"), ("yellow", "black"), ("white", "green")]:
        pixels = np.asarray(draw_person(Appearance(upper, lower, "none", "black", "black"), rng), dtype=float)
        torso = pixels[32:44, 18:30].reshape(-1, 3).mean(axis=0)
        legs = pixels[66:80, 15:21].reshape(-1, 3).mean(axis=0)
        # Brightness varies by at most 15 %, so the hue direction of the region matches the colour name.
        for region, name in ((torso, upper), (legs, lower)):
            expected = np.array(CLOTHING_COLOURS[name], dtype=float)
            assert np.abs(region - expected).max() < 0.16 * 255, (name, region)


def test_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="'Market1501'"):
        write_synthetic(tmp_path, "Market1501")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DatasetError, match="num_ids"):
            write_synthetic(tmp_path, "RSTPReid", num_ids=bad)
    assert not any(tmp_path.iterdir())


# ---- test-split options and named variants -------------------------------------------------------

def test_test_split_options_set_identities_images_and_captions(tmp_path):
    from php_runner.data.synthetic import TestSplitSize

    write_synthetic(tmp_path, "ICFG-PEDES", num_ids=3, seed=0,
                    test=TestSplitSize(identities=4, images_per_identity=5, captions_per_image=2))
    dataset = read_dataset(tmp_path, "ICFG-PEDES")
    stats = {r["subset"]: (r["ids"], r["images"], r["captions"]) for r in dataset_statistics(dataset)}
    assert stats["train"] == (3, 12, 12) and stats["test"] == (4, 20, 40)
    # Annotation order, person by person: images and captions come in the same identity order.
    assert dataset.test.image_pids == [pid for pid in sorted(set(dataset.test.image_pids)) for _ in range(5)]
    assert dataset.test.caption_pids == [pid for pid in dataset.test.image_pids for _ in range(2)]


def test_default_test_split_options_keep_the_default_files(tmp_path, synthetic_root):
    from php_runner.data.synthetic import TestSplitSize

    write_synthetic(tmp_path, "RSTPReid", num_ids=4, seed=0, test=TestSplitSize())
    assert files_of(tmp_path / "RSTPReid") == files_of(synthetic_root / "RSTPReid")


@pytest.mark.parametrize("field", ["identities", "images_per_identity", "captions_per_image"])
def test_test_split_options_reject_non_positive_values(field):
    from php_runner.data.synthetic import TestSplitSize

    with pytest.raises(DatasetError, match=field.replace("_", " ")):
        TestSplitSize(**{field: 0})


def test_icfg_scale_variant_has_a_realistic_test_split():
    from php_runner.data.synthetic import VARIANTS

    variant = VARIANTS["icfg-scale"]
    images = variant.test.identities * variant.test.images_per_identity
    assert variant.dataset == "ICFG-PEDES" and variant.test.captions_per_image == 1
    assert images >= 2000 and images / 64 > 30


def test_variant_problem_names_a_folder_of_another_shape(tmp_path, monkeypatch):
    from php_runner.data import synthetic

    small = synthetic.SyntheticVariant("ICFG-PEDES", 2, synthetic.TestSplitSize(3, 4, 1), "small")
    monkeypatch.setitem(synthetic.VARIANTS, "small", small)
    synthetic.write_variant(tmp_path / "v", "small")
    assert synthetic.variant_problem(tmp_path / "v", "small") is None
    assert len(read_dataset(tmp_path / "v", "ICFG-PEDES").test.img_paths) == 12
    write_synthetic(tmp_path / "d", "ICFG-PEDES", num_ids=2)
    problem = synthetic.variant_problem(tmp_path / "d", "small")
    assert "ICFG-PEDES.json" in problem and "'small' variant 3 / 12 / 12" in problem
    with pytest.raises(DatasetError, match="unknown"):
        synthetic.write_variant(tmp_path, "nope")
