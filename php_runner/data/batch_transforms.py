"""The official train and test transforms (spec 6) applied to whole uint8 batches on the device.

Input is what the image cache stores: ``(B, H, W, 3)`` uint8, already resized by the official PIL
bilinear ``Resize``. The train pipeline is, in the official order, ``RandomHorizontalFlip(0.5)`` ->
``Pad(10, fill 0)`` -> ``RandomCrop((H, W))`` -> ``ToTensor`` -> ``Normalize`` -> ``RandomErasing(p 0.5,
scale (0.02, 0.4), ratio (0.3, 3.3), value = the mean triple)`` (erasing after normalisation, so the
erased pixels hold the raw mean values), or flip -> ``ToTensor`` -> ``Normalize`` without ``img_aug``.

Flip, pad and crop only move uint8 pixels, so they are done on the uint8 batch (a row select and a
column gather); ``ToTensor`` +
``Normalize`` are the same float32 operations torchvision performs (divide by 255, subtract the mean,
divide by the std), so given the same random parameters every sample equals torchvision's output
bit for bit. The random parameters are drawn per sample from an explicit ``torch.Generator`` with the
distributions of torchvision's ``get_params`` (erasing: up to 10 attempts, the first that fits wins,
none fitting leaves the image alone). They are drawn on the CPU, whatever the device, so a seed gives
the same augmentation on every device, and travel to the device as one small tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from php_runner.data.transforms import CLIP_MEAN, CLIP_STD

PAD = 10
FLIP_P = 0.5
ERASE_P = 0.5
ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10


def to_normalised(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                  channels_first: bool = False) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` (or ``(..., 3, H, W)`` with ``channels_first``) -> contiguous float
    ``(..., 3, H, W)`` by the operations of ``ToTensor`` then ``Normalize`` (in place after the copy)."""
    images = (pixels if channels_first else pixels.movedim(-1, -3)).contiguous().to(torch.get_default_dtype())
    mean_t = torch.as_tensor(mean, dtype=images.dtype).to(images.device, non_blocking=True).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype).to(images.device, non_blocking=True).view(-1, 1, 1)
    return images.div_(255).sub_(mean_t).div_(std_t)


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random parameters of one batch (CPU or device tensors of length B)."""

    flip: torch.Tensor  # bool: mirror the sample
    top: torch.Tensor  # crop offset in the padded image, 0..2*PAD (0 without padding)
    left: torch.Tensor
    erase: torch.Tensor  # bool: an erasing box is applied
    box: torch.Tensor  # (B, 4) long: top, left, height, width of the erased box (zeros when not erased)

    def to(self, device) -> AugmentParams:
        packed = torch.cat([self.flip[:, None].long(), self.top[:, None], self.left[:, None], self.erase[:, None].long(),
                            self.box], dim=1).to(device, non_blocking=True)  # one host-to-device copy
        return AugmentParams(packed[:, 0].bool(), packed[:, 1], packed[:, 2], packed[:, 3].bool(), packed[:, 4:])


def _randint_below(bounds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform integers in ``[0, bounds)`` elementwise, as ``torch.randint(0, bound)`` per element."""
    uniform = torch.rand(bounds.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((uniform * bounds).floor().long(), bounds - 1)


def sample_erasing(batch_size: int, image_size: tuple[int, int], generator: torch.Generator,
                   p: float = ERASE_P, scale=ERASE_SCALE, ratio=ERASE_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """``(erase, box)`` with the law of ``RandomErasing``: apply with probability ``p``, then the first of
    10 attempts whose box fits strictly inside the image; none fitting means no change."""
    height, width = image_size
    area = height * width
    applied = torch.rand(batch_size, generator=generator) < p
    shape = (batch_size, ERASE_ATTEMPTS)
    # The same float32 draws torchvision makes, combined in float64 as its Python arithmetic does.
    fraction = torch.empty(shape).uniform_(scale[0], scale[1], generator=generator).double()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = torch.exp(torch.empty(shape).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)).double()
    erase_area = area * fraction
    box_h = torch.sqrt(erase_area * aspect).round().long()  # round half to even, as Python's round
    box_w = torch.sqrt(erase_area / aspect).round().long()
    fits = (box_h < height) & (box_w < width)
    first = torch.argmax(fits.int(), dim=1)
    rows = torch.arange(batch_size)
    box_h, box_w = box_h[rows, first], box_w[rows, first]
    erase = applied & fits.any(dim=1)
    box_h, box_w = torch.where(erase, box_h, 0), torch.where(erase, box_w, 0)
    top = _randint_below(height - box_h + 1, generator)
    left = _randint_below(width - box_w + 1, generator)
    return erase, torch.stack([torch.where(erase, top, 0), torch.where(erase, left, 0), box_h, box_w], dim=1)


def sample_params(batch_size: int, image_size: tuple[int, int], generator: torch.Generator,
                  img_aug: bool = True) -> AugmentParams:
    """Random parameters of the official train pipeline for a batch, on the CPU."""
    flip = torch.rand(batch_size, generator=generator) < FLIP_P
    if not img_aug:
        zeros = torch.zeros(batch_size, dtype=torch.long)
        return AugmentParams(flip, zeros, zeros, torch.zeros(batch_size, dtype=torch.bool), torch.zeros(batch_size, 4, dtype=torch.long))
    offsets = torch.full((batch_size,), 2 * PAD + 1)
    top, left = _randint_below(offsets, generator), _randint_below(offsets, generator)
    erase, box = sample_erasing(batch_size, image_size, generator)
    return AugmentParams(flip, top, left, erase, box)


def flip_pad_crop(pixels: torch.Tensor, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor, pad: int) -> torch.Tensor:
    """Per sample: mirror when ``flip``, zero-pad by ``pad``, crop the input size at ``(top, left)``.

    uint8 ``(B, H, W, 3)`` in, uint8 ``(B, 3, H, W)`` out. The padded batch is made channels-first
    once; the crop's rows are then one ``index_select`` of whole rows and its columns one ``gather``.
    Padding is symmetric, so the crop of the padded mirror image reads the padded image's columns
    in mirrored order.
    """
    batch, height, width, channels = pixels.shape
    padded = F.pad(pixels.permute(0, 3, 1, 2), (pad, pad, pad, pad))
    padded_h, padded_w = height + 2 * pad, width + 2 * pad
    device = pixels.device
    planes = torch.arange(batch * channels, device=device)[:, None] * padded_h
    rows = planes + top.repeat_interleave(channels)[:, None] + torch.arange(height, device=device)
    cropped_rows = padded.reshape(-1, padded_w).index_select(0, rows.reshape(-1)).view(batch, channels, height, padded_w)
    cols = left[:, None] + torch.arange(width, device=device)
    cols = torch.where(flip[:, None], padded_w - 1 - cols, cols)
    return cropped_rows.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


def erase_boxes(images: torch.Tensor, erase: torch.Tensor, box: torch.Tensor, value: Sequence[float]) -> torch.Tensor:
    """Write ``value`` (one per channel) into each erased sample's box of float ``(B, C, H, W)``, in place."""
    _, _, height, width = images.shape
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    top, left, box_h, box_w = box.unbind(dim=1)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]
    fill = torch.tensor(value, dtype=images.dtype).to(images.device, non_blocking=True).view(1, -1, 1, 1)
    return torch.where(inside[:, None], fill, images, out=images)


class BatchAugment:
    """The official train transform on uint8 batches: ``augment(pixels, generator)`` -> normalised floats."""

    def __init__(self, image_size: tuple[int, int], img_aug: bool = True,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.img_aug, self.mean, self.std = img_aug, tuple(mean), tuple(std)

    def apply(self, pixels: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The pipeline with given parameters (``params`` on the pixels' device)."""
        moved = flip_pad_crop(pixels, params.flip, params.top, params.left, PAD if self.img_aug else 0)
        images = to_normalised(moved, self.mean, self.std, channels_first=True)
        if self.img_aug:
            images = erase_boxes(images, params.erase, params.box, self.mean)
        return images

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if tuple(pixels.shape[1:3]) != self.image_size:
            raise ValueError(f"BatchAugment: pixels of size {tuple(pixels.shape[1:3])}, expected {self.image_size}")
        params = sample_params(len(pixels), self.image_size, generator, self.img_aug)
        return self.apply(pixels, params.to(pixels.device))

