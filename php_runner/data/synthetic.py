"""Synthetic datasets in the three official on-disk layouts, small and learnable.

Every identity has a distinct appearance (upper and lower clothing colours, bag, hair and shoe
colours) drawn as large flat regions of a 96x48 (HxW) JPEG, with per-image jitter, brightness and
noise. Its captions describe that appearance in words, with varied sentence templates and
distractor sentences that carry no visual information, so a tiny randomly initialised CLIP-like
model can learn to match them within a few epochs.

Default sizes (``num_ids=None``): 100 train identities with 4 images each, 25 val identities
(CUHK-PEDES and RSTPReid formats only) and 50 test identities with 2 images each. CUHK-PEDES and
RSTPReid formats have two captions per image, the ICFG-PEDES format one. ``num_ids=N`` sets the
train identities; val gets ceil(N/4) and test ceil(N/2) identities, at least 2 each. ``test``
(a ``TestSplitSize``) overrides the test split's identities, images per identity and captions per
image. Entries are grouped by identity in the annotation file, as in the real files, so the test
images and captions are loaded person by person (spec 6).

Named variants (``VARIANTS``, ``write_variant``) fix a dataset format and its sizes: ``icfg-scale``
has an ICFG-PEDES-shaped test split (100 identities with 20 images each, one caption per image:
2,000 images in 32 evaluation batches of 64, about 20 images per identity like the real 19,848 /
1,000), so that a batch-level shortcut can shrink the gallery as it can on the real set.

Output is a function of (name, num_ids, test, seed) only: the same arguments give a byte-identical
annotation file and identical images. Files already in the folder that the new annotation does not
name are left alone.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from php_runner.data.datasets import DATASET_NAMES, LAYOUTS, DatasetError
from php_runner.files import write_atomic

DEFAULT_TRAIN_IDS = 100
# More training images than evaluation images: a tiny model needs optimisation steps more than identities.
IMAGES_PER_ID = {"train": 4, "val": 2, "test": 2}
IMAGE_HEIGHT, IMAGE_WIDTH = 96, 48
CAPTIONS_PER_IMAGE = {"CUHK-PEDES": 2, "ICFG-PEDES": 1, "RSTPReid": 2}

CLOTHING_COLOURS = {
    "red": (200, 30, 30),
    "green": (40, 150, 50),
    "blue": (40, 70, 200),
    "yellow": (235, 215, 40),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "orange": (240, 140, 30),
    "purple": (130, 50, 160),
    "pink": (240, 150, 190),
    "brown": (115, 70, 35),
}
HAIR_COLOURS = {"black": (20, 15, 10), "blond": (225, 195, 110), "red": (170, 60, 20)}
SHOE_COLOURS = {"black": (20, 20, 20), "white": (245, 245, 245)}
BAGS = ("none", "backpack", "handbag")

_BAG_RGB = (70, 45, 20)
_SKIN_TONES = ((235, 200, 170), (200, 150, 110), (140, 95, 60))
_PEOPLE = {"man": "he", "woman": "she", "young man": "he", "young woman": "she", "boy": "he", "girl": "she",
           "lady": "she", "guy": "he"}
_TOPS = ("shirt", "t-shirt", "jacket", "sweater", "coat", "top", "hoodie")
_BOTTOMS = ("pants", "trousers", "jeans", "shorts", "skirt")
_MAIN_TEMPLATES = (
    "a {person} wearing a {upper} {top} and {lower} {bottom}.",
    "the {person} has on a {upper} {top} with {lower} {bottom}.",
    "this {person} is dressed in {lower} {bottom} and a {upper} {top}.",
    "{person} in a {upper} {top}, {lower} {bottom} and {shoes} shoes.",
    "a {person} with a {upper} {top} on, walking in {lower} {bottom}.",
)
_HAIR_TEMPLATES = ("{pronoun} has {hair} hair.", "{possessive} hair is {hair}.", "{pronoun} has short {hair} hair.")
_SHOE_TEMPLATES = (
    "{pronoun} wears {shoes} shoes.", "{possessive} shoes are {shoes}.", "{shoes} sneakers on {possessive} feet.",
)
_BAG_TEMPLATES = {
    "none": ("{pronoun} carries nothing.", "{pronoun} has no bag.", "no bag is visible."),
    "backpack": (
        "{pronoun} carries a backpack.", "a backpack is on {possessive} back.", "{pronoun} has a dark backpack.",
    ),
    "handbag": (
        "{pronoun} holds a handbag.", "{pronoun} has a handbag in {possessive} hand.",
        "a small bag hangs at {possessive} side.",
    ),
}
_DISTRACTORS = (
    "{pronoun} is walking down the street.",
    "{pronoun} is looking at a phone.",
    "{pronoun} stands near a wall.",
    "the photo is a little blurry.",
    "{pronoun} seems to be in a hurry.",
    "there is a tree in the background.",
    "{pronoun} is facing the camera.",
)


@dataclass(frozen=True)
class TestSplitSize:
    """The test split's shape; ``None`` fields keep the default (ceil(train/2) ids, the format's captions)."""

    __test__ = False  # not a pytest test class, despite the name

    identities: int | None = None
    images_per_identity: int = IMAGES_PER_ID["test"]
    captions_per_image: int | None = None

    def __post_init__(self) -> None:
        for name in ("identities", "images_per_identity", "captions_per_image"):
            value = getattr(self, name)
            if value is None and name != "images_per_identity":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DatasetError(f"test {name.replace('_', ' ')}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class SyntheticVariant:
    """A named synthetic set: one dataset format, its train identities and its test split's shape."""

    dataset: str
    train_ids: int
    test: TestSplitSize
    description: str


VARIANTS = {
    "icfg-scale": SyntheticVariant(
        dataset="ICFG-PEDES",
        train_ids=DEFAULT_TRAIN_IDS,
        test=TestSplitSize(identities=100, images_per_identity=20, captions_per_image=1),
        description="ICFG-PEDES format, test split of 100 identities x 20 images x 1 caption (2,000 images)",
    ),
}


@dataclass(frozen=True)
class Appearance:
    """What identifies a person, visually and in words."""

    upper: str
    lower: str
    bag: str
    hair: str
    shoes: str


def write_synthetic(
    root: str | Path, name: str = "all", num_ids: int | None = None, seed: int = 0, test: TestSplitSize | None = None
) -> list[Path]:
    """Write one dataset (or all three for ``name="all"``) under ``root``; returns the annotation files."""
    if name != "all" and name not in DATASET_NAMES:
        raise DatasetError(f"dataset name {name!r} is unknown; expected 'all' or one of {', '.join(DATASET_NAMES)}")
    train_ids = DEFAULT_TRAIN_IDS if num_ids is None else num_ids
    if isinstance(train_ids, bool) or not isinstance(train_ids, int) or train_ids < 1:
        raise DatasetError(f"num_ids: expected a positive integer, got {num_ids!r}")
    _check_writable_folder(Path(root))
    names = DATASET_NAMES if name == "all" else (name,)
    return [_write_one(Path(root), dataset, train_ids, seed, test or TestSplitSize()) for dataset in names]


def _check_writable_folder(root: Path) -> None:
    """``root`` is (or can be created as) a folder we may write: its nearest existing path is a folder."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DatasetError(f"{root}: not a folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DatasetError(f"{root}: cannot write there ({existing} is not writable)")


def write_variant(root: str | Path, variant: str, seed: int = 0) -> Path:
    """Write the named variant's dataset folder under ``root``; returns its annotation file."""
    chosen = _variant(variant)
    return write_synthetic(root, chosen.dataset, chosen.train_ids, seed, chosen.test)[0]


def variant_problem(root: str | Path, variant: str) -> str | None:
    """Why the dataset under ``root`` is not the named variant (its test split's shape), or None when it is."""
    chosen = _variant(variant)
    annotation = Path(root) / chosen.dataset / LAYOUTS[chosen.dataset].annotation_files[0]
    try:
        entries = json.loads(annotation.read_text(encoding="utf-8"))
        test = [entry for entry in entries if entry["split"] == "test"]
        found = (len({entry["id"] for entry in test}), len(test), sum(len(entry["captions"]) for entry in test))
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"{annotation}: cannot read it as a synthetic {chosen.dataset} annotation ({err})"
    shape = chosen.test
    expected = (shape.identities, shape.identities * shape.images_per_identity,
                shape.identities * shape.images_per_identity * shape.captions_per_image)
    if found != expected:
        return (f"{annotation}: test split has {found[0]} ids / {found[1]} images / {found[2]} captions, "
                f"the {variant!r} variant {expected[0]} / {expected[1]} / {expected[2]}")
    return None


def _variant(name: str) -> SyntheticVariant:
    if name not in VARIANTS:
        raise DatasetError(f"synthetic variant {name!r} is unknown; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def split_sizes(train_ids: int, name: str, test_ids: int | None = None) -> dict[str, int]:
    """Identities per split for ``train_ids`` training identities (no val split in the ICFG format)."""
    sizes = {"train": train_ids}
    if name != "ICFG-PEDES":
        sizes["val"] = max(2, math.ceil(train_ids / 4))
    sizes["test"] = max(2, math.ceil(train_ids / 2)) if test_ids is None else test_ids
    return sizes


def sample_appearances(count: int, rng: random.Random) -> list[Appearance]:
    """``count`` distinct appearances, drawn without replacement from every attribute combination."""
    axes = (tuple(CLOTHING_COLOURS), tuple(CLOTHING_COLOURS), BAGS, tuple(HAIR_COLOURS), tuple(SHOE_COLOURS))
    total = math.prod(len(axis) for axis in axes)
    if count > total:
        raise DatasetError(f"num_ids: {count} identities in all exceed the {total} distinct synthetic appearances")
    appearances = []
    for code in rng.sample(range(total), count):
        values = []
        for axis in axes:
            code, position = divmod(code, len(axis))
            values.append(axis[position])
        appearances.append(Appearance(*values))
    return appearances


def describe(appearance: Appearance, rng: random.Random) -> str:
    """One caption: a sentence about the clothes, then the bag and maybe hair, shoes and a distractor, shuffled."""
    person = rng.choice(tuple(_PEOPLE))
    pronoun = _PEOPLE[person]
    words = {
        "person": person, "upper": appearance.upper, "lower": appearance.lower, "top": rng.choice(_TOPS),
        "bottom": rng.choice(_BOTTOMS), "hair": appearance.hair, "shoes": appearance.shoes,
        "pronoun": pronoun, "possessive": {"he": "his", "she": "her"}[pronoun],
    }
    # Short captions train a tiny text encoder much faster, so hair, shoes and a distractor are each
    # mentioned only sometimes; clothes and bag always.
    extras = [rng.choice(_BAG_TEMPLATES[appearance.bag])]
    extras += [rng.choice(t) for t in (_HAIR_TEMPLATES, _SHOE_TEMPLATES, _DISTRACTORS) if rng.random() < 0.4]
    rng.shuffle(extras)
    sentences = [rng.choice(_MAIN_TEMPLATES)] + extras
    text = " ".join(s.format(**words) for s in sentences)
    return re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def draw_person(appearance: Appearance, rng: random.Random) -> Image.Image:
    """A 96x48 picture of ``appearance`` with per-image jitter, background, brightness and noise."""
    background = tuple(rng.randint(90, 200) for _ in range(3))
    image = Image.new("RGB", (IMAGE_WIDTH, IMAGE_HEIGHT), background)
    draw = ImageDraw.Draw(image)
    dx, dy = rng.randint(-3, 3), rng.randint(-2, 2)

    def box(x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
        return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)

    upper = CLOTHING_COLOURS[appearance.upper]
    lower = CLOTHING_COLOURS[appearance.lower]
    shoes = SHOE_COLOURS[appearance.shoes]
    draw.ellipse(box(17, 3, 31, 22), fill=rng.choice(_SKIN_TONES))
    draw.chord(box(16, 2, 32, 16), 180, 360, fill=HAIR_COLOURS[appearance.hair])
    draw.rectangle(box(12, 22, 36, 54), fill=upper)
    draw.rectangle(box(6, 24, 11, 50), fill=upper)
    draw.rectangle(box(37, 24, 42, 50), fill=upper)
    draw.rectangle(box(13, 55, 35, 86), fill=lower)
    draw.rectangle(box(23, 64, 25, 86), fill=background)
    draw.rectangle(box(12, 87, 23, 93), fill=shoes)
    draw.rectangle(box(25, 87, 36, 93), fill=shoes)
    if appearance.bag == "backpack":
        draw.rectangle(box(33, 25, 45, 47), fill=_BAG_RGB)
    elif appearance.bag == "handbag":
        draw.line(box(38, 30, 41, 50), fill=_BAG_RGB, width=2)
        draw.rectangle(box(36, 50, 46, 62), fill=_BAG_RGB)

    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.85, 1.15)
    pixels += noise_rng.normal(0.0, 6.0, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _image_path(name: str, split: str, raw_id: int, index: int) -> str:
    """Relative paths shaped like the real files of each format."""
    if name == "CUHK-PEDES":
        return f"{split}/{raw_id:05d}_{index:02d}.jpg"
    if name == "ICFG-PEDES":
        return f"{split}/{raw_id:04d}/{raw_id:04d}_{index:03d}.jpg"
    return f"{raw_id:04d}_c{index + 1:02d}_{index:04d}.jpg"


def _write_one(root: Path, name: str, train_ids: int, seed: int, test: TestSplitSize) -> Path:
    rng = random.Random(f"php-run synthetic {name} {seed}")
    sizes = split_sizes(train_ids, name, test.identities)
    images_per_id = {**IMAGES_PER_ID, "test": test.images_per_identity}
    captions_per_image = {split: CAPTIONS_PER_IMAGE[name] for split in sizes}
    if test.captions_per_image is not None:
        captions_per_image["test"] = test.captions_per_image
    appearances = iter(sample_appearances(sum(sizes.values()), rng))
    folder = root / name
    # CUHK-PEDES ids are 1-based in the file (the official reader trains on id - 1); the others 0-based.
    raw_id = 1 if name == "CUHK-PEDES" else 0
    layout = LAYOUTS[name]
    entries = []
    for split, count in sizes.items():
        for _ in range(count):
            appearance = next(appearances)
            for index in range(images_per_id[split]):
                rel_path = _image_path(name, split, raw_id, index)
                write_atomic(folder / "imgs" / rel_path, _jpeg_bytes(draw_person(appearance, rng)))
                captions = [describe(appearance, rng) for _ in range(captions_per_image[split])]
                entry = {"split": split, "captions": captions, layout.path_field: rel_path, "id": raw_id}
                if name != "RSTPReid":
                    entry["processed_tokens"] = [re.findall(r"[a-z]+|[^\sa-z]", c.lower()) for c in captions]
                entries.append(entry)
            raw_id += 1
    annotation = folder / layout.annotation_files[0]
    write_atomic(annotation, json.dumps(entries, indent=1).encode("utf-8"))
    return annotation


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()
