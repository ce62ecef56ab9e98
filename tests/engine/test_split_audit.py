"""Tests of php_runner/engine/split_audit.py: planted leakage between splits is found, a clean set shows none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from php_runner.data import read_dataset, write_synthetic
from php_runner.engine import split_audit


# ----------------------------------------------------------------------------------------------
# planted leakage in a synthetic dataset


def _plant_leaks(data_root: Path) -> dict:
    """Write a CUHK-format set and plant one leak of each kind into its test split."""
    (annotation,) = write_synthetic(data_root, "CUHK-PEDES", num_ids=4, seed=0)
    entries = json.loads(annotation.read_text())
    train = [e for e in entries if e["split"] == "train"]
    test = [e for e in entries if e["split"] == "test"]
    images = annotation.parent / "imgs"
    # A byte copy of a train image under a new test path: same content, different path.
    shutil.copyfile(images / train[0]["file_path"], images / "test" / "copied.jpg")
    test[0]["file_path"] = "test/copied.jpg"
    # The very same path in both splits.
    test[1]["file_path"] = train[2]["file_path"]
    # A train caption of identity 1 reused for a test identity.
    test[2]["captions"][0] = "  " + train[0]["captions"][0].upper() + " "
    # A test identity that is also a train identity (raw id 2 = train pid 1).
    test[3]["id"] = train[2]["id"]
    annotation.write_text(json.dumps(entries))
    return {"train": train, "test": test, "images": images}


def test_split_audit_finds_planted_overlaps(tmp_path):
    planted = _plant_leaks(tmp_path)
    dataset = read_dataset(tmp_path, "CUHK-PEDES")
    report = split_audit.split_audit(split_audit.split_views(dataset), max_examples=5, hash_workers=2)
    overlap = report["overlaps"]["train-test"]
    images = planted["images"]
    assert overlap["image_paths"] == {"count": 1, "examples": [str(images / planted["train"][2]["file_path"])]}
    assert overlap["image_content"]["count"] == 2
    assert [str(images / planted["train"][0]["file_path"]), str(images / "test" / "copied.jpg")] in overlap[
        "image_content"]["examples"]
    assert overlap["identities"] == {"count": 1, "examples": [planted["train"][2]["id"]]}
    shared = report["captions_shared_across_identities"]
    assert shared["count"] == 1
    holders = shared["examples"][0]["holders"]
    assert ["train", planted["train"][0]["id"]] in holders and ["test", planted["test"][2]["id"]] in holders
    # The untouched val split shares nothing with train.
    assert all(entry["count"] == 0 for entry in report["overlaps"]["train-val"].values())
    train_images = len({item.img_path for item in dataset.train})
    assert report["splits"]["train"]["captions_per_image"] == {"2": train_images}  # two per image in this format
    assert report["unreadable_images"]["count"] == 0


def test_split_audit_of_a_clean_synthetic_set_finds_nothing(tmp_path):
    write_synthetic(tmp_path, "ICFG-PEDES", num_ids=4, seed=0)
    dataset = read_dataset(tmp_path, "ICFG-PEDES")
    report = split_audit.split_audit(split_audit.split_views(dataset))
    assert [entry["count"] for entry in report["overlaps"]["train-test"].values()] == [0, 0, 0]
    assert report["captions_shared_across_identities"]["count"] == 0
    assert report["splits"]["train"]["captions_per_image"] == {"1": len(dataset.train)}  # one per image
