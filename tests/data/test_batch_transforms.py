"""Batched augmentation against torchvision's per-sample ops: equal given the parameters, same laws over many draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from php_runner.data.batch_transforms import (
    PAD,
    AugmentParams,
    BatchAugment,
    sample_erasing,
    sample_params,
    to_normalised,
)
from php_runner.data.transforms import CLIP_MEAN, CLIP_STD, build_transform

SIZE = (48, 24)
OFFICIAL_SIZE = (384, 128)
DRAWS = 4000
# Two-sample Kolmogorov-Smirnov critical distance at alpha = 0.001 for DRAWS vs DRAWS samples
# (1.949 * sqrt(2 / DRAWS) = 0.0436); conservative for these discrete laws.
KS_LIMIT = 1.949 * (2 / DRAWS) ** 0.5


def ks_distance(a, b) -> float:
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.union1d(a, b)
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


def random_pixels(batch: int, size=SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def torchvision_sample(pixels: np.ndarray, flip: bool, top: int, left: int, erase: bool, box, img_aug: bool = True):
    """The official train steps after Resize, one by one on a PIL image with fixed parameters."""
    image = Image.fromarray(pixels)
    if flip:
        image = TF.hflip(image)
    if img_aug:
        image = TF.crop(TF.pad(image, PAD, fill=0), top, left, *pixels.shape[:2])
    tensor = TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)
    if img_aug and erase:
        tensor = TF.erase(tensor, *[int(v) for v in box], torch.tensor(CLIP_MEAN)[:, None, None])
    return tensor


@pytest.mark.parametrize("img_aug", [True, False])
def test_batch_equals_torchvision_ops_given_the_parameters(img_aug):
    pixels = random_pixels(32)
    params = sample_params(32, SIZE, torch.Generator().manual_seed(3), img_aug=img_aug)
    # Make sure every branch occurs in this batch.
    assert params.flip.any() and (~params.flip).any()
    if img_aug:
        assert params.erase.any() and (~params.erase).any() and (params.top != params.left).any()
    batched = BatchAugment(SIZE, img_aug=img_aug).apply(pixels, params)
    for index in range(32):
        expected = torchvision_sample(pixels[index].numpy(), bool(params.flip[index]), int(params.top[index]),
                                      int(params.left[index]), bool(params.erase[index]), params.box[index], img_aug)
        assert torch.equal(batched[index], expected), index


def test_edge_offsets_and_full_boxes_equal_torchvision():
    pixels = random_pixels(4)
    params = AugmentParams(
        flip=torch.tensor([True, False, True, False]),
        top=torch.tensor([0, 2 * PAD, 0, 2 * PAD]), left=torch.tensor([2 * PAD, 0, 0, 2 * PAD]),
        erase=torch.tensor([True, True, False, True]),
        box=torch.tensor([[0, 0, SIZE[0] - 1, SIZE[1] - 1], [SIZE[0] - 2, SIZE[1] - 2, 2, 2], [0, 0, 0, 0], [5, 3, 1, 1]]),
    )
    batched = BatchAugment(SIZE).apply(pixels, params)
    for index in range(4):
        expected = torchvision_sample(pixels[index].numpy(), bool(params.flip[index]), int(params.top[index]),
                                      int(params.left[index]), bool(params.erase[index]), params.box[index])
        assert torch.equal(batched[index], expected)


def test_test_time_conversion_equals_to_tensor_and_normalize():
    pixels = random_pixels(3)
    expected = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(p.numpy())), CLIP_MEAN, CLIP_STD) for p in pixels])
    assert torch.equal(to_normalised(pixels), expected)
    # And equals the full test transform on an image already at the size (Resize is then the identity).
    image = Image.fromarray(pixels[0].numpy())
    assert torch.equal(to_normalised(pixels[0]), build_transform(SIZE)(image))


def test_flip_rate_and_crop_offsets_follow_torchvision():
    generator = torch.Generator().manual_seed(11)
    ours = sample_params(DRAWS, OFFICIAL_SIZE, generator)
    torch.manual_seed(12)
    padded = torch.zeros(1, OFFICIAL_SIZE[0] + 2 * PAD, OFFICIAL_SIZE[1] + 2 * PAD)
    theirs = np.array([T.RandomCrop.get_params(padded, OFFICIAL_SIZE)[:2] for _ in range(DRAWS)])
    flips = [bool(torch.rand(1) < 0.5) for _ in range(DRAWS)]
    # Flip rate within 4 binomial standard deviations of torchvision's p = 0.5 (and of its own sample).
    limit = 4 * (0.25 / DRAWS) ** 0.5
    assert abs(ours.flip.float().mean().item() - 0.5) < limit and abs(np.mean(flips) - 0.5) < limit
    for ours_offset, theirs_offset in ((ours.top, theirs[:, 0]), (ours.left, theirs[:, 1])):
        assert set(ours_offset.tolist()) == set(theirs_offset.tolist()) == set(range(2 * PAD + 1))
        assert ks_distance(ours_offset.numpy(), theirs_offset) < KS_LIMIT
    assert ks_distance(ours.top.numpy(), ours.left.numpy()) < KS_LIMIT


def test_erasing_boxes_follow_torchvision():
    ours_erase, ours_box = sample_erasing(DRAWS, OFFICIAL_SIZE, torch.Generator().manual_seed(5))
    torch.manual_seed(6)
    eraser = T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=CLIP_MEAN)
    image = torch.zeros(3, *OFFICIAL_SIZE)
    theirs = []
    for _ in range(DRAWS):
        if torch.rand(1) < eraser.p:
            i, j, h, w, v = eraser.get_params(image, eraser.scale, eraser.ratio, list(CLIP_MEAN))
            theirs.append((v is not image, i, j, h, w))  # the fallback returns the image itself: no change
        else:
            theirs.append((False, 0, 0, 0, 0))
    theirs = np.array(theirs, dtype=float)
    erased_theirs = theirs[theirs[:, 0] == 1]
    erased_ours = ours_box[ours_erase].numpy()
    # Erasing rate (p times the chance that one of 10 attempts fits) within 4 standard deviations.
    assert abs(ours_erase.float().mean().item() - theirs[:, 0].mean()) < 4 * (0.5 / DRAWS) ** 0.5
    assert (erased_ours[:, 2] < OFFICIAL_SIZE[0]).all() and (erased_ours[:, 3] < OFFICIAL_SIZE[1]).all()
    assert (erased_ours[:, 0] + erased_ours[:, 2] <= OFFICIAL_SIZE[0]).all()
    assert (erased_ours[:, 1] + erased_ours[:, 3] <= OFFICIAL_SIZE[1]).all()
    for column in range(4):  # top, left, height, width
        assert ks_distance(erased_ours[:, column], erased_theirs[:, column + 1]) < 2 * KS_LIMIT, column
    areas = erased_ours[:, 2] * erased_ours[:, 3], erased_theirs[:, 3] * erased_theirs[:, 4]
    assert ks_distance(*areas) < 2 * KS_LIMIT
    assert (ours_box[~ours_erase] == 0).all()


def test_same_generator_state_same_augmentation_and_device_independent_draws():
    pixels = random_pixels(8)
    augment = BatchAugment(SIZE)
    first = augment(pixels, torch.Generator().manual_seed(9))
    again = augment(pixels, torch.Generator().manual_seed(9))
    other = augment(pixels, torch.Generator().manual_seed(10))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="expected"):
        augment(random_pixels(2, (32, 16)), torch.Generator())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_equals_cpu_batch():
    pixels = random_pixels(16)
    augment = BatchAugment(SIZE)
    cpu = augment(pixels, torch.Generator().manual_seed(4))
    cuda = augment(pixels.cuda(), torch.Generator().manual_seed(4))
    # Devices round divisions differently (CUDA may multiply by a reciprocal), so the contract is one float32
    # ulp, not bits: one ulp of the [0, 1] pixel carried through Normalize (atol = eps / smallest std) plus one
    # ulp of the result (rtol = eps). Measured on an H200: at most 4.8e-7, in 38% of the elements.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=eps, atol=eps / min(CLIP_STD))
