"""Torch datasets: official sample layouts, default collation, values equal to direct reads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from php_runner.data.datasets import DatasetError, read_dataset
from php_runner.data.loaders import ImageSet, TextSet, TrainPairs, read_image
from php_runner.data.tokenizer import tokenize
from php_runner.data.transforms import build_transform

SIZE = (48, 24)


@pytest.fixture(scope="module")
def cuhk(synthetic_root):
    return read_dataset(synthetic_root, "CUHK-PEDES")


def test_train_pairs_batches_with_the_official_keys(cuhk):
    transform = build_transform(SIZE)
    pairs = TrainPairs(cuhk.train, transform)
    assert len(pairs) == len(cuhk.train) == 32
    batch = next(iter(DataLoader(pairs, batch_size=5, shuffle=False)))
    assert set(batch) == {"pids", "image_ids", "images", "caption_ids"}
    assert batch["pids"].tolist() == [item.pid for item in cuhk.train[:5]]
    assert batch["image_ids"].tolist() == [item.image_id for item in cuhk.train[:5]]
    assert batch["images"].shape == (5, 3, *SIZE) and batch["images"].dtype == torch.float32
    assert batch["caption_ids"].shape == (5, 77) and batch["caption_ids"].dtype == torch.long
    for index in (0, 3):
        item = cuhk.train[index]
        with Image.open(item.img_path) as image:
            torch.testing.assert_close(batch["images"][index], transform(image.convert("RGB")))
        assert torch.equal(batch["caption_ids"][index], tokenize(item.caption))


def test_train_pairs_context_length(cuhk):
    assert TrainPairs(cuhk.train[:2], build_transform(SIZE), context_length=20)[1]["caption_ids"].shape == (20,)


def test_image_set_yields_pid_and_image_in_order(cuhk):
    transform = build_transform(SIZE)
    images = ImageSet(cuhk.test.image_pids, cuhk.test.img_paths, transform)
    pids, tensors = next(iter(DataLoader(images, batch_size=64)))
    assert pids.tolist() == cuhk.test.image_pids
    assert tensors.shape == (len(cuhk.test.img_paths), 3, *SIZE)
    with Image.open(cuhk.test.img_paths[-1]) as image:
        torch.testing.assert_close(tensors[-1], transform(image.convert("RGB")))


def test_text_set_yields_pid_and_tokens_in_order(cuhk):
    texts = TextSet(cuhk.test.caption_pids, cuhk.test.captions)
    pids, tokens = next(iter(DataLoader(texts, batch_size=64)))
    assert pids.tolist() == cuhk.test.caption_pids
    assert torch.equal(tokens, torch.stack([tokenize(c) for c in cuhk.test.captions]))


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        TextSet([1, 2], ["only one"])
    with pytest.raises(ValueError):
        ImageSet([1], [], build_transform(SIZE))


def test_images_are_converted_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (4, 6), 128).save(path)
    image = read_image(str(path))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)


def test_unreadable_image_gives_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not\nan image")
    with pytest.raises(DatasetError) as excinfo:
        read_image(str(path))
    assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)
