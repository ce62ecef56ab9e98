"""Torch datasets in the official sample layouts: training pairs, evaluation images, evaluation texts.

Captions are tokenised once, when a dataset is built, because the BPE tokenizer is slow per call
and the same captions are read every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from php_runner.data.datasets import DatasetError, TrainItem
from php_runner.data.tokenizer import CONTEXT_LENGTH, tokenize_all

# The official reader accepts truncated image files.
ImageFile.LOAD_TRUNCATED_IMAGES = True


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``; a file that cannot be read gives a one-line ``DatasetError``."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read as an image ({err})") from err


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
    """Evaluation images as ``(pid, image)`` in the given order."""

    def __init__(self, pids: Sequence[int], paths: Sequence[str], transform: Callable):
        if len(pids) != len(paths):
            raise ValueError(f"ImageSet: {len(pids)} pids for {len(paths)} image paths")
        self.pids = list(pids)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return self.pids[index], self.transform(read_image(self.paths[index]))


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
