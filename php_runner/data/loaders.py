"""Torch datasets in the official sample layouts: training pairs, evaluation images, evaluation texts.

Captions are tokenised once, when a dataset is built, because the BPE tokenizer is slow per call
and the same captions are read every epoch. Images come either from the files, decoded per sample
through a PIL transform (the official pipeline), or from an image cache (``data/cache.py``): then
evaluation images are the cached pixels through ``ToTensor`` + ``Normalize`` (identical tensors),
and training batches are gathered from the cache and augmented in batch on the device
(``CachedTrainBatches``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from php_runner.data.batch_transforms import BatchAugment, to_normalised
from php_runner.data.datasets import TrainItem
from php_runner.data.images import read_image
from php_runner.data.tokenizer import CONTEXT_LENGTH, tokenize_all

PIPELINES = ("cache", "pil")  # where training and evaluation images come from (spec field data.pipeline)


class TrainPairs(Dataset):
    """Training samples as dicts ``pids, image_ids, images, caption_ids`` (default collate stacks them)."""

    def __init__(self, items: Sequence[TrainItem], transform: Callable, context_length: int = CONTEXT_LENGTH):
        self.items = list(items)
        self.transform = transform
        self.caption_ids = tokenize_all([item.caption for item in self.items], context_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {
            "pids": item.pid,
            "image_ids": item.image_id,
            "images": self.transform(read_image(item.img_path)),
            "caption_ids": self.caption_ids[index],
        }


class ImageSet(Dataset):
    """Evaluation images as ``(pid, image)`` in the given order.

    With ``cache`` (an open ``ImageCache`` at the transform's size) the image is the cached pixels
    through ``ToTensor`` + ``Normalize``, which equals the test ``transform`` of the file.
    """

    def __init__(self, pids: Sequence[int], paths: Sequence[str], transform: Callable, cache=None):
        if len(pids) != len(paths):
            raise ValueError(f"ImageSet: {len(pids)} pids for {len(paths)} image paths")
        self.pids = list(pids)
        self.paths = list(paths)
        self.transform = transform
        self.cache = cache
        self.rows = cache.rows_of(self.paths) if cache is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        if self.cache is not None:
            return self.pids[index], to_normalised(self.cache.pixels([self.rows[index]])[0])
        return self.pids[index], self.transform(read_image(self.paths[index]))


class CachedTrainBatches:
    """Training batches from an image cache, augmented in batch on ``device``.

    Iterating gives one epoch: a ``torch.randperm`` of the samples drawn from ``generator`` (the law
    of a shuffling ``DataLoader``), batches of ``batch_size`` (the last one partial, as the official
    ``drop_last=False``), each batch's uint8 pixels moved to the device once and augmented there with
    random parameters drawn from the same ``generator``, so its state replays shuffling and augmentation.
    Batches are dicts ``pids, image_ids, images, caption_ids``; ``images`` are on ``device``.
    """

    def __init__(self, items: Sequence[TrainItem], cache, augment: BatchAugment, batch_size: int,
                 generator: torch.Generator, device, context_length: int = CONTEXT_LENGTH):
        self.items = list(items)
        self.rows = torch.tensor(cache.rows_of([item.img_path for item in self.items]), dtype=torch.long)
        self.pids = torch.tensor([item.pid for item in self.items], dtype=torch.long)
        self.image_ids = torch.tensor([item.image_id for item in self.items], dtype=torch.long)
        self.caption_ids = tokenize_all([item.caption for item in self.items], context_length)
        self.cache, self.augment, self.batch_size = cache, augment, batch_size
        self.generator, self.device = generator, torch.device(device)

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        order = torch.randperm(len(self.items), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            pixels = self.cache.pixels(self.rows[chosen].numpy())
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            yield {
                "pids": self.pids[chosen],
                "image_ids": self.image_ids[chosen],
                "images": self.augment(pixels.to(self.device, non_blocking=True), self.generator),
                "caption_ids": self.caption_ids[chosen],
            }


class TextSet(Dataset):
    """Evaluation captions as ``(pid, token_ids)`` in the given order."""

    def __init__(self, pids: Sequence[int], captions: Sequence[str], context_length: int = CONTEXT_LENGTH):
        if len(pids) != len(captions):
            raise ValueError(f"TextSet: {len(pids)} pids for {len(captions)} captions")
        self.pids = list(pids)
        self.token_ids = tokenize_all(list(captions), context_length)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return self.pids[index], self.token_ids[index]
