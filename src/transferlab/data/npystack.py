"""A stack of images as arrays: root/images.npy (uint8, N x C x H x W or N x H x W x C) and
root/labels.npy (N integers or strings). Any channel count (`data.channels`: RGB + depth, RGB +
infrared, multispectral), which image files cannot carry. Read memory-mapped, without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from transferlab.data.base import SourceData, data_channels
from transferlab.data.transforms import InputSpec
from transferlab.errors import DataError

IMAGES_FILE, LABELS_FILE = "images.npy", "labels.npy"


def _read(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing: data.source=npy reads {IMAGES_FILE} and {LABELS_FILE} from data.root")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # object arrays need pickle: refused
        reason = str(err).strip().splitlines()[0][:120]
        raise DataError(f"{path} is not a plain .npy array ({reason}): save it with np.save, without objects") from err


def channels_first(images: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """uint8 [N, C, H, W] (a view): the channel axis is the one of size `channels` (axis 1 first);
    N x H x W is one channel. One channel also fits data.channels=3 (repeated, as greyscale)."""
    if images.dtype != np.uint8:
        raise DataError(
            f"{path} holds {images.dtype}, not uint8: save 0-255 images, e.g. np.clip(x * 255, 0, 255).astype(np.uint8)"
        )
    fits = (channels, 1) if channels == 3 else (channels,)
    if images.ndim == 3 and 1 in fits:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] in fits:
        return images
    if images.ndim == 4 and images.shape[3] in fits:
        return images.transpose(0, 3, 1, 2)
    raise DataError(
        f"{path} has shape {tuple(images.shape)}, not N x {channels} x H x W or N x H x W x {channels} "
        f"(data.channels={channels}): set data.channels to its channel count"
    )


def centre_square(images: np.ndarray) -> np.ndarray:
    """The centre square of each image (a view), as image files are cropped."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top : top + side, left : left + side]


def class_labels(labels: np.ndarray, n: int, path: Path) -> tuple[np.ndarray, list[str]]:
    """Integer or string labels -> (int64 indices, class names in sorted order of the values)."""
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path} has shape {tuple(labels.shape)}: save one label per image, shape ({n},)")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype.kind == "U"):
        raise DataError(f"{path} holds {labels.dtype}: save integer or string labels")
    values, index = np.unique(np.asarray(labels), return_inverse=True)
    return index.astype(np.int64).reshape(-1), [str(v) for v in values]


def load_npy(cfg: DictConfig, spec: InputSpec) -> SourceData:
    """root/images.npy + root/labels.npy -> decoded images (memory-mapped: the store reads them
    chunk by chunk) and labels; val/test are carved from them."""
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist: point it at a folder with {IMAGES_FILE} and {LABELS_FILE}")
    images_path = root / IMAGES_FILE
    images = centre_square(channels_first(_read(images_path, mmap=True), data_channels(cfg), images_path))
    labels, names = class_labels(_read(root / LABELS_FILE, mmap=False), len(images), root / LABELS_FILE)
    return SourceData(images, labels, names)
