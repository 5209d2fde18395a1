"""What every source loader returns, plus the PIL decode helper the file-based sources share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


Loader = Callable[[DictConfig, InputSpec], SourceData]

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def fit_pil(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """RGB image -> uint8 [3, size, size]: shorter side to size, centre crop (keeps aspect).

    Done at decode time so variable-sized sources are cached once, at the size the model uses.
    """
    img = img.convert("RGB")
    w, h = img.size
    scale = spec.size / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    img = img.resize((nw, nh), _PIL_RESAMPLE.get(spec.interpolation, Image.Resampling.BILINEAR))
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    img = img.crop((left, top, left + spec.size, top + spec.size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
