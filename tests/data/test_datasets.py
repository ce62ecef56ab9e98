"""Dataset readers: official split/pid/image-id/order rules on all three formats, one-line errors."""

from __future__ import annotations

import json
import os

import pytest

from php_runner.data.datasets import (
    DATASET_NAMES,
    DatasetError,
    check_dataset,
    dataset_statistics,
    read_dataset,
)
from php_runner.errors import InputError


def entry(split, raw_id, path, captions, path_field="file_path"):
    return {"split": split, "id": raw_id, path_field: path, "captions": captions}


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- the official rules on hand-made files ---------------------------------------------------------


def test_cuhk_rules_pid_is_id_minus_one_in_train_raw_id_elsewhere_and_file_order_kept(make_annotated):
    entries = [
        entry("test", 7, "t/a.jpg", ["ta1", "ta2"]),
        entry("train", 2, "x/b.jpg", ["b1", "b2"]),
        entry("validation", 9, "v/c.jpg", ["c1"]),
        entry("train", 1, "x/d.jpg", ["d1"]),
        entry("test", 5, "t/e.jpg", ["e1", "e2", "e3"]),
        entry("train", 2, "x/f.jpg", ["f1"]),
        entry("val", 9, "v/g.jpg", ["g1", "g2"]),
    ]
    root = make_annotated("CUHK-PEDES", entries)
    ds = read_dataset(root, "CUHK-PEDES")
    imgs = str(root / "CUHK-PEDES" / "imgs")
    assert [(i.pid, i.image_id, i.caption) for i in ds.train] == [
        (1, 0, "b1"), (1, 0, "b2"), (0, 1, "d1"), (1, 2, "f1"),
    ]
    assert ds.train[0].img_path == os.path.join(imgs, "x/b.jpg")
    assert ds.num_classes == 2
    assert ds.test.image_pids == [7, 5]
    assert ds.test.img_paths == [os.path.join(imgs, "t/a.jpg"), os.path.join(imgs, "t/e.jpg")]
    assert ds.test.caption_pids == [7, 7, 5, 5, 5]
    assert ds.test.captions == ["ta1", "ta2", "e1", "e2", "e3"]
    # Every split that is neither train nor test is val, in file order.
    assert ds.val.image_pids == [9, 9]
    assert ds.val.captions == ["c1", "g1", "g2"]
    assert ds.root == root / "CUHK-PEDES"


def test_rstpreid_uses_img_path_and_raw_train_ids(make_annotated):
    entries = [
        entry("train", 1, "b.jpg", ["b"], "img_path"),
        entry("train", 0, "a.jpg", ["a1", "a2"], "img_path"),
        entry("test", 40, "t.jpg", ["t"], "img_path"),
    ]
    ds = read_dataset(make_annotated("RSTPReid", entries), "RSTPReid")
    assert [(i.pid, i.image_id, i.caption) for i in ds.train] == [(1, 0, "b"), (0, 1, "a1"), (0, 1, "a2")]
    assert ds.val is None
    assert ds.test.caption_pids == [40]


@pytest.mark.parametrize("file_name", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_reads_either_file_name_and_has_no_val(make_annotated, file_name):
    entries = [entry("train", 0, "train/0/a.jpg", ["a"]), entry("test", 3, "test/3/b.jpg", ["b"])]
    ds = read_dataset(make_annotated("ICFG-PEDES", entries, annotation=file_name), "ICFG-PEDES")
    assert [(i.pid, i.image_id) for i in ds.train] == [(0, 0)]
    assert ds.val is None and ds.test.image_pids == [3]


def test_string_ids_are_read_as_integers_like_the_official_int_call(make_annotated):
    entries = [entry("train", "0", "a.jpg", ["a"], "img_path"), entry("test", "12", "b.jpg", ["b"], "img_path")]
    ds = read_dataset(make_annotated("RSTPReid", entries), "RSTPReid")
    assert ds.train[0].pid == 0 and ds.test.image_pids == [12]


# --- synthetic sets of every format ----------------------------------------------------------------


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_synthetic_sets_read_back_with_expected_counts_pids_and_order(synthetic_root, name):
    ds = read_dataset(synthetic_root, name)
    annotation = {"CUHK-PEDES": "reid_raw.json", "ICFG-PEDES": "ICFG-PEDES.json",
                  "RSTPReid": "data_captions.json"}[name]
    raw = json.loads((synthetic_root / name / annotation).read_text())
    captions_per_image = 1 if name == "ICFG-PEDES" else 2
    offset = 1 if name == "CUHK-PEDES" else 0
    # 4 train ids with 4 images each; 2 val ids (none in ICFG) and 2 test ids with 2 images each.
    rows = {row["subset"]: row for row in dataset_statistics(ds)}
    assert rows["train"] == {"subset": "train", "ids": 4, "images": 16, "captions": 16 * captions_per_image}
    assert rows["test"] == {"subset": "test", "ids": 2, "images": 4, "captions": 4 * captions_per_image}
    expected_val = 0 if name == "ICFG-PEDES" else 2
    assert rows["val"] == {"subset": "val", "ids": expected_val, "images": 2 * expected_val,
                           "captions": 2 * expected_val * captions_per_image}
    assert ds.num_classes == 4
    # Grouped by identity: pids 0,0,1,1,... with captions_per_image samples per image.
    assert [item.pid for item in ds.train] == [pid for pid in range(4) for _ in range(4 * captions_per_image)]
    assert [item.image_id for item in ds.train] == [i for i in range(16) for _ in range(captions_per_image)]
    train_entries = [e for e in raw if e["split"] == "train"]
    assert [item.caption for item in ds.train] == [c for e in train_entries for c in e["captions"]]
    assert [item.pid for item in ds.train] == [e["id"] - offset for e in train_entries for _ in e["captions"]]
    test_entries = [e for e in raw if e["split"] == "test"]
    assert ds.test.image_pids == [e["id"] for e in test_entries]
    assert ds.test.captions == [c for e in test_entries for c in e["captions"]]
    # Test ids follow train (and val) ids and never overlap them.
    assert min(ds.test.image_pids) > max(e["id"] for e in train_entries)
    assert all(os.path.isfile(p) for p in ds.test.img_paths + [i.img_path for i in ds.train])


def test_cuhk_synthetic_ids_are_one_based_in_the_file(synthetic_root):
    raw = json.loads((synthetic_root / "CUHK-PEDES" / "reid_raw.json").read_text())
    assert sorted({e["id"] for e in raw if e["split"] == "train"}) == [1, 2, 3, 4]


def test_check_dataset_reports_statistics_and_no_problems_on_a_good_set(synthetic_root):
    rows, problems = check_dataset(synthetic_root, "RSTPReid")
    assert problems == []
    assert [row["subset"] for row in rows] == ["train", "test", "val"]


# --- one-line errors -------------------------------------------------------------------------------


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(tmp_path, "Market1501")
    assert_one_line_error(excinfo, "'Market1501'", "CUHK-PEDES")
    assert isinstance(excinfo.value, InputError)
    with pytest.raises(DatasetError):
        check_dataset(tmp_path, "Market1501")


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(tmp_path, "CUHK-PEDES")
    assert_one_line_error(excinfo, str(tmp_path / "CUHK-PEDES"), "folder not found")
    assert check_dataset(tmp_path, "CUHK-PEDES") == ([], [str(excinfo.value)])


def test_missing_annotation_file_names_both_accepted_icfg_names(tmp_path):
    (tmp_path / "ICFG-PEDES" / "imgs").mkdir(parents=True)
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(tmp_path, "ICFG-PEDES")
    assert_one_line_error(excinfo, str(tmp_path / "ICFG-PEDES"), "ICFG-PEDES.json or ICFG_PEDES.json", "not found")


def test_malformed_json(make_annotated):
    root = make_annotated("RSTPReid", text='[{"split": "train",\n "id": ')
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "RSTPReid")
    assert_one_line_error(excinfo, str(root / "RSTPReid" / "data_captions.json"), "malformed JSON")


def test_json_that_is_not_a_list(make_annotated):
    root = make_annotated("RSTPReid", {"annotations": []})
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "RSTPReid")
    assert_one_line_error(excinfo, "data_captions.json", "expected a JSON list", "dict")


def test_missing_field_names_entry_index_and_field(make_annotated):
    entries = [entry("train", 1, "a.jpg", ["a"]), {"split": "test", "id": 2, "file_path": "b.jpg"}]
    root = make_annotated("CUHK-PEDES", entries)
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "CUHK-PEDES")
    assert_one_line_error(excinfo, str(root / "CUHK-PEDES" / "reid_raw.json"), "entry 1: field 'captions' is missing")


def test_same_defect_in_many_entries_is_one_line_with_a_count_and_examples(make_annotated):
    entries = [{"split": "train", "captions": ["x"], "id": i} for i in range(5)]
    rows, problems = check_dataset(make_annotated("RSTPReid", entries), "RSTPReid")
    assert problems[0].endswith("data_captions.json: 5 entries (0, 1, 2, ...): field 'img_path' is missing")


@pytest.mark.parametrize(
    ("bad_entry", "fragments"),
    [
        (entry("train", "one", "a.jpg", ["a"]), ("entry 0", "'id'", "integer")),
        (entry("train", True, "a.jpg", ["a"]), ("entry 0", "'id'", "integer")),
        (entry("train", 0, "a.jpg", "a caption"), ("entry 0", "'captions'", "list of strings")),
        (entry("train", 0, 5, ["a"]), ("entry 0", "'file_path'", "string")),
        (entry(["train"], 0, "a.jpg", ["a"]), ("entry 0", "'split'")),
        ("just text", ("entry 0", "expected an object, got str")),
    ],
)
def test_badly_typed_fields(make_annotated, bad_entry, fragments):
    root = make_annotated("ICFG-PEDES", [bad_entry, entry("test", 1, "t.jpg", ["t"])])
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "ICFG-PEDES")
    assert_one_line_error(excinfo, "ICFG-PEDES.json", *fragments)


def test_icfg_refuses_a_val_split(make_annotated):
    entries = [entry("train", 0, "a.jpg", ["a"]), entry("val", 1, "v.jpg", ["v"]), entry("test", 2, "t.jpg", ["t"])]
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(make_annotated("ICFG-PEDES", entries), "ICFG-PEDES")
    assert_one_line_error(excinfo, "ICFG-PEDES.json", "entry 1", "'split'", "no val split")


def test_missing_images_give_count_and_first_paths(make_annotated):
    entries = [entry("train", 0, f"p/{i}.jpg", ["c"], "img_path") for i in range(5)]
    entries.append(entry("test", 9, "t.jpg", ["t"], "img_path"))
    root = make_annotated("RSTPReid", entries, images=False)
    (root / "RSTPReid" / "imgs" / "t.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "RSTPReid")
    assert_one_line_error(excinfo, "data_captions.json", "5 of 6 images do not exist",
                          str(root / "RSTPReid" / "imgs"), "p/0.jpg, p/1.jpg, p/2.jpg, ...")


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ([entry("test", 0, "t.jpg", ["t"])], "train split has no captions"),
        ([entry("train", 1, "a.jpg", ["a"]), entry("val", 2, "v.jpg", ["v"])], "test split has no images"),
        ([entry("train", 1, "a.jpg", ["a"]), entry("test", 2, "t.jpg", [])], "test split has no captions"),
    ],
)
def test_empty_splits(make_annotated, entries, fragment):
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(make_annotated("CUHK-PEDES", entries), "CUHK-PEDES")
    assert_one_line_error(excinfo, "reid_raw.json", fragment)


def test_cuhk_ids_starting_at_zero_break_the_train_pid_rule(make_annotated):
    entries = [entry("train", 0, "a.jpg", ["a"]), entry("train", 1, "b.jpg", ["b"]), entry("test", 5, "t.jpg", ["t"])]
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(make_annotated("CUHK-PEDES", entries), "CUHK-PEDES")
    assert_one_line_error(excinfo, "reid_raw.json", "train pids (id - 1) must be exactly 0..1", "from -1 to 0")


def test_train_pids_with_a_gap_are_refused(make_annotated):
    entries = [entry("train", i, f"{i}.jpg", ["c"], "img_path") for i in (0, 1, 3, 5)]
    entries.append(entry("test", 9, "t.jpg", ["t"], "img_path"))
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(make_annotated("RSTPReid", entries), "RSTPReid")
    assert_one_line_error(excinfo, "data_captions.json", "must be exactly 0..3", "missing 2, 4")


def test_check_dataset_collects_every_problem_and_still_counts(make_annotated):
    entries = [
        entry("train", 1, "a.jpg", ["a"]),
        {"split": "train", "id": 2, "file_path": "b.jpg"},
        entry("train", 3, "c.jpg", ["c"]),
        entry("test", 4, "t.jpg", ["t1", "t2"]),
    ]
    root = make_annotated("CUHK-PEDES", entries)
    os.remove(root / "CUHK-PEDES" / "imgs" / "c.jpg")
    rows, problems = check_dataset(root, "CUHK-PEDES")
    assert len(problems) == 3
    assert "entry 1: field 'captions' is missing" in problems[0]
    assert "1 of 3 images do not exist" in problems[1] and "c.jpg" in problems[1]
    assert "train pids (id - 1) must be exactly 0..1" in problems[2]
    assert all("reid_raw.json" in p and "\n" not in p for p in problems)
    assert rows[0] == {"subset": "train", "ids": 2, "images": 2, "captions": 2}
    assert rows[1] == {"subset": "test", "ids": 1, "images": 1, "captions": 2}
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "CUHK-PEDES")
    assert_one_line_error(excinfo, "entry 1", "(and 2 more problems)")


def test_line_breaks_in_paths_do_not_break_the_one_line_message(make_annotated):
    entries = [entry("train", 0, "bad\nname.jpg", ["a"], "img_path"), entry("test", 1, "t.jpg", ["t"], "img_path")]
    root = make_annotated("RSTPReid", entries, images=False)
    (root / "RSTPReid" / "imgs" / "t.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as excinfo:
        read_dataset(root, "RSTPReid")
    assert_one_line_error(excinfo, "1 of 2 images do not exist", "bad name.jpg")
