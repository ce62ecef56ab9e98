"""The official image pipelines (spec 6) on torchvision: test, train, and train with ``img_aug``."""

from __future__ import annotations

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transform(image_size: tuple[int, int] = (384, 128), train: bool = False, img_aug: bool = False) -> T.Compose:
    """PIL image -> normalised float tensor ``(3, H, W)``; ``image_size`` is ``(H, W)``.

    ``img_aug`` only matters when ``train`` is true, as in the official code.
    """
    size = tuple(image_size)
    resize = T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)
    to_tensor_normalised = [T.ToTensor(), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if not train:
        return T.Compose([resize, *to_tensor_normalised])
    if not img_aug:
        return T.Compose([resize, T.RandomHorizontalFlip(0.5), *to_tensor_normalised])
    return T.Compose([
        resize,
        T.RandomHorizontalFlip(0.5),
        T.Pad(10),
        T.RandomCrop(size),
        *to_tensor_normalised,
        # The official code erases with the mean triple written into the already-normalised tensor.
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=CLIP_MEAN),
    ])
