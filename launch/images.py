"""Image data for ``model.input: patches``: scikit-learn's digits or a local image folder.

Shape letters: N images, B micro batch, C channels, H/W height/width.

    data = build_image_data(config.data, config.model)   # Data: train/val Splits of images
    images = shift_images(batch.tokens, max_shift=1, generator=generator)   # augmentation

Sources (``data.path``):
* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8, grey levels 0-16,
  10 classes), read from the installed package: no network. Needs ``pip install scikit-learn``.
* a directory with one subdirectory per class (``root/cat/*.png``, ``root/dog/*.jpg``):
  classes are the sorted subdirectory names, read with Pillow as grey (channels=1) or RGB
  (channels=3) and resized to ``model.image.image_size``.

Images become float32 [N, C, H, W], are split into train/validation (test) by a fixed
permutation of ``data.split_seed`` with ``data.val_fraction`` held out, and normalised per
channel with the mean and standard deviation of the training split. The Split's ``tokens``
field holds the images and ``labels`` the classes; there is no tokenizer. Training batches
may be shifted by up to ``data.augment_shift`` pixels (edge-replicated) as light augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from launch.data import Data, DataConfig, DataError, Split
from moe.transformer import ModelConfig

DIGITS = "digits"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageSet:
    """Images float32 [N, C, H, W] (raw scale), labels int64 [N], one name per class."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def load_digits_images() -> ImageSet:
    """scikit-learn's bundled 8x8 digits as [1797, 1, 8, 8] float32 in [0, 16]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError(
            "data.path digits needs scikit-learn (bundled, no download): pip install scikit-learn"
        ) from err
    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return ImageSet(images, labels, [str(name) for name in digits.target_names])


def load_image_folder(root: Path, channels: int, size: tuple[int, int]) -> ImageSet:
    """Class-per-subdirectory images resized to ``size`` (H, W): [N, C, H, W] float32 in [0, 1]."""
    if channels not in (1, 3):
        raise DataError(
            f"model.image.channels ({channels}) must be 1 (grey) or 3 (RGB) for an image folder"
        )
    try:
        from PIL import Image
    except ImportError as err:
        raise DataError("an image folder in data.path needs Pillow: pip install pillow") from err
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"data.path {root} has no class subdirectories; lay it out as {root}/CLASS/IMAGE.png"
        )
    arrays, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            with Image.open(file) as image:
                converted = image.convert("L" if channels == 1 else "RGB")
                resized = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(resized, dtype=np.float32) / 255.0
            arrays.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
            labels.append(index)
    if not arrays:
        raise DataError(
            f"data.path {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {classes}"
        )
    images = torch.from_numpy(np.stack(arrays))
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes)


def check_image_source(path: str | None) -> None:
    """Refuse, before anything loads, an image source that is neither digits nor a folder."""
    if path == DIGITS:
        return
    if path is None:
        raise DataError(
            "model.input patches needs image data: set data.path to 'digits' or a folder of "
            "class subdirectories"
        )
    if not Path(path).expanduser().is_dir():
        raise DataError(
            f"data.path {path} is not a directory; use 'digits' or a folder laid out as "
            "ROOT/CLASS/IMAGE.png"
        )


def load_images(path: str | None, channels: int, size: tuple[int, int]) -> ImageSet:
    """The images ``data.path`` names, at ``size`` (H, W) with ``channels`` channels."""
    if path == DIGITS:
        found = load_digits_images()
        if channels != 1:  # grey digits as RGB: the same plane in every channel
            found = ImageSet(
                found.images.expand(-1, channels, -1, -1), found.labels, found.class_names
            )
        if tuple(found.images.shape[-2:]) != tuple(size):
            resized = F.interpolate(found.images, size=size, mode="bilinear", antialias=True)
            found = ImageSet(resized, found.labels, found.class_names)
        return found
    if path is None:
        raise DataError(
            "model.input patches needs image data: set data.path to 'digits' or a folder of "
            "class subdirectories"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.path {path} is not a directory; use 'digits' or a folder laid out as "
            "ROOT/CLASS/IMAGE.png"
        )
    return load_image_folder(root, channels, size)


def build_image_data(config: DataConfig, model: ModelConfig) -> Data:
    """Load, split (fixed permutation of data.split_seed) and normalise the images."""
    if model.image is None:
        raise DataError("image data needs model.image (image_size, patch_size, channels)")
    found = load_images(config.path, model.image.channels, model.image.size)
    num_classes = len(found.class_names)
    if num_classes > model.num_classes:
        raise DataError(
            f"data.path {config.path} has {num_classes} classes but model.num_classes is "
            f"{model.num_classes}; set model.num_classes={num_classes}"
        )
    count = len(found.labels)
    num_val = max(1, math.ceil(config.val_fraction * count))
    if count - num_val < 1:
        raise DataError(f"data.path {config.path} has {count} image(s); need at least 2")
    order = torch.from_numpy(np.random.default_rng(config.split_seed).permutation(count))
    train_index, val_index = order[num_val:], order[:num_val]
    train_images = found.images[train_index]
    # Per-channel statistics of the training split only, so the test split stays unseen.
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def normalised(index: torch.Tensor) -> torch.Tensor:
        return ((found.images[index] - mean) / std).contiguous()

    return Data(
        train=Split(normalised(train_index), labels=found.labels[train_index]),
        val=Split(normalised(val_index), labels=found.labels[val_index]),
        tokenizer=None,
        num_documents=count,
    )


def shift_images(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by its own random (dy, dx) in [-s, s] (edge-replicated)."""
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(height)  # [B, H] rows of the padded image
    cols = offsets[:, 1, None] + torch.arange(width)  # [B, W]
    batch_index = torch.arange(batch)[:, None, None]
    # Advanced indexing: [B, H, W, C] -> back to [B, C, H, W].
    picked = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()
