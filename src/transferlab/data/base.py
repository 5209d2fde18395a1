"""What every source loader returns, plus the PIL decode helper the file-based sources share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from transferlab.data.transforms import InputSpec

# Values of SourceData.split: where a source ships its own partition.
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}


@dataclass
class SourceData:
    """Decoded images of a source. `split` is None when the source has no partition of its own;
    splits it lacks (e.g. val for CIFAR) are carved from train."""

    images: np.ndarray  # uint8 [N, C, H, W], C in (1, 3)
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


def fit_pil(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """RGB image -> uint8 [3, S, S] with S = spec.store_size: shorter side to S, centre square
    (keeps aspect). Stored once at S >= the model's size, so train crops have room and eval
    takes timm's centre crop (crop_pct) from it.
    """
    size = spec.store_size
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), _PIL_RESAMPLE.get(spec.interpolation, Image.Resampling.BILINEAR))
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
