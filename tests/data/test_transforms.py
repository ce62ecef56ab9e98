"""The three official pipelines: exact steps and parameters, and the test pipeline against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from php_runner.data.transforms import CLIP_MEAN, CLIP_STD, build_transform


def steps(pipeline):
    return [type(step) for step in pipeline.transforms]


def check_resize(step, size):
    assert isinstance(step, T.Resize)
    assert tuple(step.size) == size
    assert step.interpolation == T.InterpolationMode.BILINEAR


def check_normalize(step):
    assert isinstance(step, T.Normalize)
    assert tuple(step.mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(step.std) == (0.26862954, 0.26130258, 0.27577711)


def test_test_pipeline_steps():
    pipeline = build_transform((384, 128))
    assert steps(pipeline) == [T.Resize, T.ToTensor, T.Normalize]
    check_resize(pipeline.transforms[0], (384, 128))
    check_normalize(pipeline.transforms[2])
    # img_aug only applies to training.
    assert steps(build_transform((384, 128), train=False, img_aug=True)) == steps(pipeline)


def test_train_pipeline_without_augmentation():
    pipeline = build_transform((384, 128), train=True)
    assert steps(pipeline) == [T.Resize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    check_resize(pipeline.transforms[0], (384, 128))
    assert pipeline.transforms[1].p == 0.5
    check_normalize(pipeline.transforms[3])


def test_train_pipeline_with_img_aug():
    pipeline = build_transform((384, 128), train=True, img_aug=True)
    assert steps(pipeline) == [
        T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor, T.Normalize, T.RandomErasing,
    ]
    resize, flip, pad, crop, _, normalize, erase = pipeline.transforms
    check_resize(resize, (384, 128))
    assert flip.p == 0.5
    assert pad.padding == 10 and pad.fill == 0 and pad.padding_mode == "constant"
    assert tuple(crop.size) == (384, 128) and crop.padding is None
    check_normalize(normalize)
    assert erase.p == 0.5
    assert erase.scale == (0.02, 0.4) and erase.ratio == (0.3, 3.3)
    assert tuple(erase.value) == CLIP_MEAN  # the mean triple, written into the normalised tensor
    assert erase.inplace is False


def test_img_aug_output_has_the_image_size_and_erases_with_the_mean_triple():
    pipeline = build_transform((48, 24), train=True, img_aug=True)
    image = Image.new("RGB", (30, 70), (255, 0, 0))
    torch.manual_seed(0)
    outputs = [pipeline(image) for _ in range(20)]
    assert all(out.shape == (3, 48, 24) for out in outputs)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert any(torch.isclose(out, mean.expand_as(out)).all(dim=0).any() for out in outputs)


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def direct_test_transform(image, size):
    """PIL bilinear resize, scale to [0, 1], subtract the CLIP mean, divide by the CLIP std."""
    height, width = size
    pixels = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float64) / 255.0
    normalised = (pixels - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(normalised.transpose(2, 0, 1)).float()


@pytest.mark.parametrize(("source", "size"), [((200, 70), (384, 128)), ((96, 48), (48, 24)), ((33, 17), (64, 32))])
def test_test_pipeline_matches_direct_computation(source, size):
    image = random_image(*source)
    out = build_transform(size)(image)
    assert out.shape == (3, *size) and out.dtype == torch.float32
    torch.testing.assert_close(out, direct_test_transform(image, size), rtol=0, atol=1e-5)


def test_train_pipeline_is_the_test_output_or_its_mirror():
    image = random_image(100, 40, seed=3)
    expected = direct_test_transform(image, (48, 24))
    pipeline = build_transform((48, 24), train=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        out = pipeline(image)
        if torch.allclose(out, expected, atol=1e-5):
            seen.add("plain")
        else:
            torch.testing.assert_close(out, expected.flip(-1), rtol=0, atol=1e-5)
            seen.add("mirrored")
    assert seen == {"plain", "mirrored"}
