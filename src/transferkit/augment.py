"""Training-time augmentation: the presets (torchvision transforms v2, PIL image in, PIL image out) and the
augmented views of a data set, seeded by (seed, epoch, image) so that any process draws the same crop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit.backbone import Preprocessing
from transferkit.data import ImageDecodeError, decode_image, read_item
from transferkit.errors import DataError
from transferkit.multilabel import target_of

AUGMENTS = ("none", "light", "vgg", "strong")
# fastai's aug_transforms crops at least 35% of the picture; timm's 8% suits ImageNet-scale training, not a few
# hundred photos.
RESIZED_CROP_SCALE = (0.35, 1.0)


def check_augment(name: str) -> None:
    if name not in AUGMENTS:
        raise DataError(f"augment must be one of {', '.join(AUGMENTS)}, not {name!r}.")


def train_transform(name: str, size: int, preprocessing: Preprocessing) -> Callable:
    """The `name` preset at `size` pixels square, with the backbone's interpolation.

    none: the evaluation resize + centre crop at the training size. light: random resized crop + horizontal flip.
    vgg: the short side resized to a random size in [256, 512] (scaled by size/224), random crop, flip.
    strong: light + rotation up to 10% of a turn and 10% zoom (Keras' RandomRotation(0.1)/RandomZoom(0.1)),
    brightness/contrast/saturation jitter and RandAugment.
    """
    from torchvision.transforms import v2

    check_augment(name)
    interpolation = v2.InterpolationMode(preprocessing.interpolation)
    flip = v2.RandomHorizontalFlip()
    if name == "none":
        return v2.Compose([v2.Resize(math.floor(size / preprocessing.crop_pct), interpolation), v2.CenterCrop(size)])
    if name == "vgg":
        shortest = list(range(round(256 * size / 224), round(512 * size / 224) + 1))
        return v2.Compose([v2.RandomShortestSize(shortest, interpolation=interpolation), v2.RandomCrop(size), flip])
    crop = v2.RandomResizedCrop(size, scale=RESIZED_CROP_SCALE, interpolation=interpolation)
    if name == "light":
        return v2.Compose([crop, flip])
    return v2.Compose([
        v2.RandomAffine(degrees=36, scale=(0.9, 1.1), interpolation=v2.InterpolationMode.BILINEAR),
        crop, flip,
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BILINEAR),
    ])


def decode_size(name: str, size: int) -> int:
    """The smallest side a JPEG may be draft-decoded to for the preset, so crops are never upsampled much."""
    return math.ceil(512 * size / 224) if name == "vgg" else 2 * size


def mix_seed(*numbers: int) -> int:
    """One seed from several numbers (seed, epoch, image, purpose): every random choice is a function of them."""
    value = 0
    for number in numbers:
        value = (value * 1_000_003 + number) % (2**63 - 1)
    return value


class Unreadable(NamedTuple):
    """An image that could be read when the run started and cannot now (deleted, moved, being rewritten)."""

    index: int
    reason: str


class AugmentedImages(Dataset):
    """(epoch, index) -> (uint8 HWC pixels, target), augmented with randomness seeded by (seed, epoch, index).

    An image that has become unreadable since it was checked yields `Unreadable`; `collate` sets it apart.
    """

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, transform: Callable, decode_side: int,
                 max_pixels: int, seed: int):
        self.paths, self.targets = list(paths), np.asarray(targets)
        self.transform, self.draft = transform, (decode_side, decode_side)
        self.max_pixels, self.seed = max_pixels, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image = decode_image(read_item(self.paths[index]), self.max_pixels, self.draft)
        except ImageDecodeError as err:
            return Unreadable(index, str(err))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index, 2))
            pixels = np.asarray(self.transform(image), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()), target_of(self.targets, index)
