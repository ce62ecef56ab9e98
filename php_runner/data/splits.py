"""Held-out validation identities for datasets without a val split (ICFG-PEDES).

A seeded fraction of the training identities becomes a val split in the official evaluation
layout (images in file order, then every caption of every image in file order). The remaining
training identities are re-indexed to 0..N-1, as the official training code asserts, and their
image ids are renumbered from 0 in file order, as the official reader numbers them.
"""

from __future__ import annotations

import random
from dataclasses import replace

from php_runner.data.datasets import DatasetError, EvalSplit, PedesDataset, TrainItem


def held_out_identities(train: list[TrainItem], fraction: float, seed: int) -> list[int]:
    """The sorted training pids held out for validation: ``round(fraction * ids)``, at least one.

    Depends only on the set of training pids, the fraction and the seed, so the same dataset and
    seed always give the same identities.
    """
    pids = sorted({item.pid for item in train})
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"data.val_from_train: fraction must be between 0 and 1 (exclusive), got {fraction}")
    count = max(1, round(fraction * len(pids)))
    if count >= len(pids):
        raise DatasetError(
            f"data.val_from_train: holding out {count} of {len(pids)} training identities leaves none to train on"
        )
    return sorted(random.Random(seed).sample(pids, count))


def hold_out_validation(dataset: PedesDataset, fraction: float, seed: int) -> PedesDataset:
    """``dataset`` with a held-out set of training identities moved into a new val split."""
    if dataset.val is not None and dataset.val.img_paths:
        raise DatasetError(
            f"data.val_from_train: {dataset.name} already has a val split; set data.val_from_train to 0"
        )
    held_out = set(held_out_identities(dataset.train, fraction, seed))
    kept = [item for item in dataset.train if item.pid not in held_out]
    val_items = [item for item in dataset.train if item.pid in held_out]
    return replace(dataset, train=_reindexed(kept), val=_eval_split(val_items), num_classes=len({i.pid for i in kept}))


def _reindexed(items: list[TrainItem]) -> list[TrainItem]:
    """Pids mapped to 0..N-1 in ascending order, image ids renumbered from 0 in first-seen order."""
    new_pid = {pid: index for index, pid in enumerate(sorted({item.pid for item in items}))}
    new_image_id: dict[int, int] = {}
    for item in items:
        new_image_id.setdefault(item.image_id, len(new_image_id))
    return [replace(item, pid=new_pid[item.pid], image_id=new_image_id[item.image_id]) for item in items]


def _eval_split(items: list[TrainItem]) -> EvalSplit:
    """The evaluation layout of the held-out (image, caption) pairs; pids keep their training values."""
    images: dict[int, TrainItem] = {}
    for item in items:
        images.setdefault(item.image_id, item)
    return EvalSplit(
        image_pids=[item.pid for item in images.values()],
        img_paths=[item.img_path for item in images.values()],
        caption_pids=[item.pid for item in items],
        captions=[item.caption for item in items],
    )
