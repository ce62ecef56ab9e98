"""Datasets in the official formats, synthetic data, the CLIP tokenizer, image transforms and torch datasets."""

from php_runner.data.datasets import (
    DATASET_NAMES,
    DatasetError,
    EvalSplit,
    PedesDataset,
    TrainItem,
    check_dataset,
    dataset_statistics,
    read_dataset,
)
from php_runner.data.images import read_image
from php_runner.data.loaders import ImageSet, TextSet, TrainPairs
from php_runner.data.synthetic import TestSplitSize, write_synthetic, write_variant
from php_runner.data.tokenizer import EOT_ID, SOT_ID, tokenize, tokenize_all
from php_runner.data.transforms import CLIP_MEAN, CLIP_STD, build_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASET_NAMES",
    "EOT_ID",
    "SOT_ID",
    "DatasetError",
    "EvalSplit",
    "ImageSet",
    "PedesDataset",
    "TestSplitSize",
    "TextSet",
    "TrainItem",
    "TrainPairs",
    "build_transform",
    "check_dataset",
    "dataset_statistics",
    "read_dataset",
    "read_image",
    "tokenize",
    "tokenize_all",
    "write_synthetic",
    "write_variant",
]
