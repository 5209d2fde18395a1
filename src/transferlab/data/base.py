"""What every source loader returns, plus the PIL decode helper the file-based sources share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from transferlab.data.transforms import InputSpec
from transferlab.errors import DataError

# Values of SourceData.split: where a source ships its own partition.
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}


@dataclass
class SourceData:
    """Decoded images of a source. `split` is None when the source has no partition of its own;
    splits it lacks (e.g. val for CIFAR) are carved from train."""

    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N], indices into class_names
    class_names: list[str]
    split: np.ndarray | None = None  # int8 [N] of TRAIN/VAL/TEST
    skipped: int = 0  # unreadable files skipped


@dataclass
class SourceFiles:
    """A source whose images are still files: listed cheaply, decoded later (in parallel, into
    the prepared store). `open(i)` returns image i as a PIL image."""

    open: Callable[[int], Image.Image]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    split: np.ndarray | None = None
    names: Sequence[str] = ()  # what to call file i in an error message

    def name(self, i: int) -> str:
        return str(self.names[i]) if self.names else f"image {i}"


class OpenPath:
    """Picklable `open(i)` over a list of file paths."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __call__(self, i: int) -> Image.Image:
        return Image.open(self.paths[i])


Loader = Callable[[DictConfig, InputSpec], SourceData | SourceFiles]

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# data.channels -> the Pillow mode every image file is converted to (other counts: data.source=npy).
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def data_channels(cfg: DictConfig) -> int:
    """`data.channels`, read here only: 3 = RGB (greyscale repeated), 1 = greyscale, 4 = RGBA or
    an extra channel. Configs stored before the field existed mean 3."""
    return int(cfg.get("channels", 3))


def extra_channel_stats(cfg: DictConfig | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(`data.extra_mean`, `data.extra_std`), read here only: the normalisation of each channel
    beyond RGB (alpha, depth, ...); None where unset, or in configs stored before the fields."""

    def read(key: str) -> tuple[float, ...] | None:
        value = None if cfg is None else cfg.get(key)
        return None if value is None else tuple(float(v) for v in value)

    return read("extra_mean"), read("extra_std")


def check_array_channels(found: SourceData, channels: int, source: str) -> None:
    """An array source must hold `channels` channels; one channel fits 3 (repeated, as before)."""
    have = found.images.shape[1]
    if have != channels and not (have == 1 and channels == 3):
        fix = "data.channels=3" if have in (1, 3) else f"data.channels={have}"
        raise DataError(f"data.source={source} has {have} channel(s) per image but data.channels={channels}: set {fix}")


def fit_pil(img: Image.Image, spec: InputSpec, channels: int = 3, name: str = "") -> np.ndarray:
    """Image -> uint8 [channels, S, S] with S = spec.store_size: shorter side to S, centre square
    (keeps aspect). Stored once at S >= the model's size, so train crops have room and eval
    takes timm's centre crop (crop_pct) from it. Four channels need an alpha channel in the file
    (RGBA, LA, or transparency data): an opaque image would get a constant fourth channel.
    """
    if channels == 4 and not img.has_transparency_data:
        raise DataError(
            f"image {name or 'file'} has no alpha channel (mode {img.mode}) but data.channels=4: "
            "save every image as RGBA, or set data.channels=3"
        )
    size = spec.store_size
    img = img.convert(PIL_MODES[channels])
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), _PIL_RESAMPLE.get(spec.interpolation, Image.Resampling.BILINEAR))
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)
