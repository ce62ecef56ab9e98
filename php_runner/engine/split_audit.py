"""The data split audit: what the train, val and test splits of a dataset share.

``split_audit`` reports train/val/test overlap of image paths, image content (sha256) and
identities, captions shared across identities, and captions per image and per identity, with a few
examples of each finding. Identities are compared by annotation id (``raw_identity``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from php_runner.data import PedesDataset
from php_runner.files import file_sha256


@dataclass(frozen=True)
class SplitView:
    """What the split audit needs of one split: images with their identities, captions with theirs."""

    name: str
    image_paths: list[str]
    image_pids: list[int]  # raw annotation ids, comparable across splits
    caption_pids: list[int]
    captions: list[str]
    captions_per_image: list[int] | None  # None where the split does not link captions to images


def raw_identity(dataset_name: str, split_name: str, pid: int) -> int:
    """The annotation ``id`` behind a loader pid: CUHK-PEDES train pids are ``id - 1`` (spec 6)."""
    return pid + 1 if dataset_name == "CUHK-PEDES" and split_name == "train" else pid


def split_views(dataset: PedesDataset) -> list[SplitView]:
    """The train split (one entry per image) and the val/test evaluation splits as ``SplitView``s."""
    images: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for item in dataset.train:
        images.setdefault(str(item.img_path), raw_identity(dataset.name, "train", item.pid))
        counts[str(item.img_path)] += 1
    views = [
        SplitView(
            name="train",
            image_paths=list(images),
            image_pids=list(images.values()),
            caption_pids=[raw_identity(dataset.name, "train", item.pid) for item in dataset.train],
            captions=[item.caption for item in dataset.train],
            captions_per_image=[counts[path] for path in images],
        )
    ]
    for name in ("val", "test"):
        split = getattr(dataset, name)
        if split is None or not split.img_paths:
            continue
        views.append(
            SplitView(
                name=name,
                image_paths=[str(path) for path in split.img_paths],
                image_pids=list(split.image_pids),
                caption_pids=list(split.caption_pids),
                captions=list(split.captions),
                # EvalSplit keeps captions and images as separate lists, so captions cannot be linked to images.
                captions_per_image=None,
            )
        )
    return views


def sha256_of_file(path: str | Path) -> str | None:
    """Hex sha256 of the file's bytes, or None when it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def normalise_caption(caption: str) -> str:
    """Lower-case with collapsed whitespace, so trivially different copies of one caption match."""
    return " ".join(caption.lower().split())


def _examples(items: Iterable, limit: int) -> list:
    return sorted(items, key=str)[:limit]


def _distribution(values: Iterable[int]) -> dict[str, int]:
    counts = Counter(values)
    return {str(value): counts[value] for value in sorted(counts)}


def overlap(first: SplitView, second: SplitView, digests: dict[str, str | None], max_examples: int) -> dict:
    """Image paths, image contents (by ``digests``, path -> sha256) and identities that two splits share."""
    shared_paths = set(first.image_paths) & set(second.image_paths)
    first_hashes = defaultdict(list)
    for path in first.image_paths:
        if digests[path] is not None:
            first_hashes[digests[path]].append(path)
    shared_content = [
        (first_hashes[digests[path]][0], path)
        for path in second.image_paths
        if digests[path] is not None and digests[path] in first_hashes
    ]
    shared_ids = set(first.image_pids) & set(second.image_pids)
    return {
        "image_paths": {"count": len(shared_paths), "examples": _examples(shared_paths, max_examples)},
        "image_content": {
            "count": len(shared_content),
            "examples": [list(pair) for pair in _examples(shared_content, max_examples)],
        },
        "identities": {"count": len(shared_ids), "examples": _examples(shared_ids, max_examples)},
    }


def split_audit(views: Sequence[SplitView], max_examples: int = 5, hash_workers: int = 8) -> dict:
    """Overlaps between every pair of splits, captions shared across identities, captions per image.

    Paths are compared as the dataset reader wrote them; copies under other paths are found by content.
    """
    all_paths = sorted({path for view in views for path in view.image_paths})
    with ThreadPoolExecutor(max_workers=hash_workers) as pool:
        digests = dict(zip(all_paths, pool.map(sha256_of_file, all_paths)))
    unreadable = [path for path, digest in digests.items() if digest is None]

    overlaps = {
        f"{first.name}-{second.name}": overlap(first, second, digests, max_examples)
        for position, first in enumerate(views)
        for second in views[position + 1 :]
    }

    owners: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for view in views:
        for caption, pid in zip(view.captions, view.caption_pids):
            owners[normalise_caption(caption)].add((view.name, pid))
    shared_captions = {caption: holders for caption, holders in owners.items() if len({pid for _, pid in holders}) > 1}
    return {
        "splits": {
            view.name: {
                "images": len(view.image_paths),
                "identities": len(set(view.image_pids)),
                "captions": len(view.captions),
                "captions_per_image": None
                if view.captions_per_image is None
                else _distribution(view.captions_per_image),
                "captions_per_identity": _distribution(Counter(view.caption_pids).values()),
            }
            for view in views
        },
        "unreadable_images": {"count": len(unreadable), "examples": unreadable[:max_examples]},
        "overlaps": overlaps,
        "captions_shared_across_identities": {
            "count": len(shared_captions),
            "examples": [
                {"caption": caption, "holders": [list(holder) for holder in sorted(holders)]}
                for caption, holders in sorted(shared_captions.items())[:max_examples]
            ],
        },
    }
