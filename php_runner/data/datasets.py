"""Readers of the three official dataset layouts (CUHK-PEDES, ICFG-PEDES, RSTPReid) and their validation.

The split, pid, image-id and order rules are the official ones (spec 6): the annotation file is a
list of per-image entries; every (image, caption) pair of a train entry is one training sample,
image ids count train entries from 0 in file order and train pids must be exactly 0..N-1; test and
val splits keep their images and captions in file order with the raw ids as pids.

Problems are described in one line that names the file. ``read_dataset`` raises the first of them
as a ``DatasetError``; ``check_dataset`` collects them all for a report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from php_runner.data.limits import (
    MAX_ANNOTATION_BYTES,
    MAX_NESTING,
    MAX_PERSON_ID,
    json_depth,
)
from php_runner.errors import InputError

DATASET_NAMES = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")

# How many entry indices or paths a problem line quotes before it only counts.
_EXAMPLES_SHOWN = 3


class DatasetError(InputError):
    """A dataset folder or annotation file that cannot be read as its official format."""

    def __init__(self, message: str):
        # Paths and field values may carry line breaks; the message must stay on one line.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class TrainItem:
    """One training sample: an (image, caption) pair."""

    pid: int
    image_id: int
    img_path: str
    caption: str


@dataclass(frozen=True)
class EvalSplit:
    """A test or val split in the official evaluation layout (every list in file order)."""

    image_pids: list[int]
    img_paths: list[str]
    caption_pids: list[int]
    captions: list[str]


@dataclass(frozen=True)
class PedesDataset:
    """A dataset as the official code sees it. ``root`` is the dataset folder (``data_root/name``)."""

    name: str
    root: Path
    train: list[TrainItem]
    val: EvalSplit | None
    test: EvalSplit
    num_classes: int


@dataclass(frozen=True)
class Layout:
    """What differs between the three official formats (also used by the synthetic writer)."""

    annotation_files: tuple[str, ...]  # accepted names, the one the official code reads first
    path_field: str
    train_pid_offset: int  # train pid = id + offset
    has_val: bool  # entries whose split is neither train nor test form the val split


LAYOUTS = {
    "CUHK-PEDES": Layout(("reid_raw.json",), "file_path", -1, True),
    # The official code reads ICFG-PEDES.json; its README names the file ICFG_PEDES.json.
    "ICFG-PEDES": Layout(("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", 0, False),
    "RSTPReid": Layout(("data_captions.json",), "img_path", 0, True),
}


@dataclass
class _Entry:
    """A validated annotation entry."""

    index: int
    split: str
    pid: int  # the raw id
    img_path: str
    captions: list[str]


def read_dataset(data_root: str | Path, name: str) -> PedesDataset:
    """Read and validate ``data_root/name``; raises ``DatasetError`` naming the file on any problem."""
    dataset, problems = _parse(data_root, name)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)
    assert dataset is not None
    return dataset


def check_dataset(data_root: str | Path, name: str, decode_images: bool = True,
                  progress: bool = True) -> tuple[list[dict], list[str]]:
    """Statistics rows and every problem found, one line each. Raises only for an unknown name.

    With ``decode_images`` every existing image is decoded once (a progress bar on a terminal) and
    each unreadable, truncated or oversized one is a problem line naming its path. The statistics
    cover the entries that could be read; they are empty when the annotation file cannot be read.
    """
    dataset, problems = _parse(data_root, name)
    if dataset is None:
        return [], problems
    if decode_images:
        problems += _decode_problems(dataset, progress)
    return dataset_statistics(dataset), problems


def _decode_problems(dataset: PedesDataset, progress: bool) -> list[str]:
    from php_runner.data.images import counting_bar, image_problems

    paths = sorted({item.img_path for item in dataset.train}
                   | {p for split in (dataset.val, dataset.test) if split is not None for p in split.img_paths})
    paths = [path for path in paths if os.path.isfile(path)]  # missing ones are reported already
    with counting_bar(len(paths), f"decoding {dataset.name} images", enabled=progress) as advance:
        return [problem for _, problem in image_problems(paths, workers=os.cpu_count() or 1, on_done=advance)]


def dataset_statistics(ds: PedesDataset) -> list[dict]:
    """Rows ``subset, ids, images, captions`` for train, test and val, as the official log shows them."""
    train_images = {item.image_id for item in ds.train}
    rows = [
        {"subset": "train", "ids": len({item.pid for item in ds.train}), "images": len(train_images),
         "captions": len(ds.train)},
        _split_row("test", ds.test),
        _split_row("val", ds.val),
    ]
    return rows


def _split_row(subset: str, split: EvalSplit | None) -> dict:
    if split is None:
        return {"subset": subset, "ids": 0, "images": 0, "captions": 0}
    return {"subset": subset, "ids": len(set(split.image_pids)), "images": len(split.img_paths),
            "captions": len(split.captions)}


def _layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise DatasetError(f"dataset name {name!r} is unknown; expected one of {', '.join(DATASET_NAMES)}")
    return LAYOUTS[name]


def _parse(data_root: str | Path, name: str) -> tuple[PedesDataset | None, list[str]]:
    """The dataset built from the readable entries (None when the file is unreadable) and the problems."""
    layout = _layout(name)
    folder = Path(data_root) / name
    # os.path answers False for any OSError (a name too long, say), where Path.is_dir raises some of them.
    if not os.path.isdir(folder):
        return None, [f"{folder}: dataset folder not found"]
    annotation = next((folder / f for f in layout.annotation_files if os.path.isfile(folder / f)), None)
    if annotation is None:
        expected = " or ".join(layout.annotation_files)
        return None, [f"{folder}: annotation file {expected} not found"]
    try:
        raw = _read_annotation(annotation)
    except DatasetError as err:
        return None, [str(err)]
    if not isinstance(raw, list):
        return None, [f"{annotation}: expected a JSON list of per-image entries, got {type(raw).__name__}"]

    problems: list[str] = []
    entries = _validated_entries(raw, annotation, layout, folder / "imgs", problems)
    problems += _missing_image_problems(entries, annotation, folder / "imgs")
    dataset = _build(name, folder, entries, layout)
    problems += _split_problems(dataset, annotation, layout)
    return dataset, problems


def _read_annotation(annotation: Path) -> object:
    """The parsed annotation JSON, its size and nesting checked against the stated limits first."""
    try:
        size = annotation.stat().st_size
        if size > MAX_ANNOTATION_BYTES.value():
            raise DatasetError(f"{annotation}: {size} bytes, over the limit of {MAX_ANNOTATION_BYTES.value()} "
                               f"(${MAX_ANNOTATION_BYTES.env})")
        text = annotation.read_bytes()
    except OSError as err:
        raise DatasetError(f"{annotation}: cannot be read ({err.strerror or err})") from None
    depth = json_depth(text)
    if depth > MAX_NESTING.value():
        raise DatasetError(f"{annotation}: JSON nested {depth} deep, over the limit of {MAX_NESTING.value()} "
                           f"(${MAX_NESTING.env}); the official format nests 3 deep")
    try:
        return json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{annotation}: malformed JSON ({err})") from None


def _validated_entries(raw: list, annotation: Path, layout: Layout, img_dir: Path,
                       problems: list[str]) -> list[_Entry]:
    """Entries with every field present and well typed; one problem line per kind of defect."""
    defects: dict[str, list[int]] = {}
    entries = []
    for index, entry in enumerate(raw):
        defect = _entry_defect(entry, layout)
        if defect is not None:
            defects.setdefault(defect, []).append(index)
            continue
        entries.append(_Entry(index, entry["split"], int(entry["id"]), os.path.join(img_dir, entry[layout.path_field]),
                              list(entry["captions"])))
    for defect, indices in defects.items():
        if len(indices) == 1:
            problems.append(f"{annotation}: entry {indices[0]}: {defect}")
        else:
            problems.append(f"{annotation}: {len(indices)} entries ({_examples(indices)}): {defect}")
    return entries


def _entry_defect(entry: object, layout: Layout) -> str | None:
    """What is wrong with one entry, or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for field in ("split", "id", layout.path_field, "captions"):
        if field not in entry:
            return f"field {field!r} is missing"
    if not isinstance(entry["split"], str):
        return "field 'split' is not a string"
    if not layout.has_val and entry["split"] not in ("train", "test"):
        return "field 'split' is neither 'train' nor 'test' (this format has no val split)"
    raw_id = entry["id"]
    if isinstance(raw_id, bool) or not (isinstance(raw_id, int) or (isinstance(raw_id, str) and raw_id.isascii()
                                                                    and raw_id.isdecimal())):
        return "field 'id' is not an integer"
    if not 0 <= int(raw_id) <= MAX_PERSON_ID.value():
        return f"field 'id' is outside 0..{MAX_PERSON_ID.value()} (${MAX_PERSON_ID.env})"
    if not isinstance(entry[layout.path_field], str) or not entry[layout.path_field]:
        return f"field {layout.path_field!r} is not a non-empty string"
    captions = entry["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return "field 'captions' is not a list of strings"
    return None


def _missing_image_problems(entries: list[_Entry], annotation: Path, img_dir: Path) -> list[str]:
    missing = [e.img_path for e in entries if not os.path.isfile(e.img_path)]
    if not missing:
        return []
    shown = ", ".join(os.path.relpath(path, img_dir) for path in missing[:_EXAMPLES_SHOWN])
    etc = ", ..." if len(missing) > _EXAMPLES_SHOWN else ""
    return [f"{annotation}: {len(missing)} of {len(entries)} images do not exist under {img_dir} ({shown}{etc})"]


def _build(name: str, folder: Path, entries: list[_Entry], layout: Layout) -> PedesDataset:
    train: list[TrainItem] = []
    tests = [e for e in entries if e.split == "test"]
    vals = [e for e in entries if e.split not in ("train", "test")]
    for image_id, entry in enumerate(e for e in entries if e.split == "train"):
        pid = entry.pid + layout.train_pid_offset
        train.extend(TrainItem(pid, image_id, entry.img_path, caption) for caption in entry.captions)
    return PedesDataset(
        name=name,
        root=folder,
        train=train,
        val=_eval_split(vals) if layout.has_val and vals else None,
        test=_eval_split(tests),
        num_classes=len({item.pid for item in train}),
    )


def _eval_split(entries: list[_Entry]) -> EvalSplit:
    return EvalSplit(
        image_pids=[e.pid for e in entries],
        img_paths=[e.img_path for e in entries],
        caption_pids=[e.pid for e in entries for _ in e.captions],
        captions=[caption for e in entries for caption in e.captions],
    )


def _split_problems(dataset: PedesDataset, annotation: Path, layout: Layout) -> list[str]:
    """Empty train or test splits, and train pids that are not exactly 0..N-1."""
    problems = []
    if not dataset.train:
        problems.append(f"{annotation}: the train split has no captions")
    if not dataset.test.img_paths:
        problems.append(f"{annotation}: the test split has no images")
    elif not dataset.test.captions:
        problems.append(f"{annotation}: the test split has no captions")
    pids = sorted({item.pid for item in dataset.train})
    if pids and pids != list(range(len(pids))):
        gaps = _first_gaps(pids)
        rule = "id - 1" if layout.train_pid_offset else "id"
        detail = f"missing {_examples(gaps)}" if gaps and pids[0] >= 0 else f"smallest {pids[0]}"
        problems.append(
            f"{annotation}: train pids ({rule}) must be exactly 0..{len(pids) - 1}, got {len(pids)} distinct "
            f"pids from {pids[0]} to {pids[-1]} ({detail})"
        )
    return problems


def _first_gaps(sorted_pids: list[int]) -> list[int]:
    """The first missing values of 0..max in ``sorted_pids`` (enough to quote), without building the range."""
    gaps, expected = [], 0
    for pid in sorted_pids:
        if pid > expected:
            gaps.extend(range(expected, min(pid, expected + _EXAMPLES_SHOWN + 1)))
            if len(gaps) > _EXAMPLES_SHOWN:
                break
        expected = max(expected, pid + 1)
    return gaps


def _examples(values: list) -> str:
    shown = ", ".join(str(v) for v in values[:_EXAMPLES_SHOWN])
    return shown + (", ..." if len(values) > _EXAMPLES_SHOWN else "")
