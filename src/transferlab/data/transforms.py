"""Input spec, decode-once caching and per-batch tensor transforms (normalise, augment)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2

from transferlab.errors import ConfigError

_INTERP = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass(frozen=True)
class InputSpec:
    """What the backbone expects; the data module adapts every source to it."""

    size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # timm's eval centre crop: the model sees size/store_size of the image

    @property
    def store_size(self) -> int:
        """Side of the prepared images: eval centre-crops `size` from it (timm's
        floor(size / crop_pct)), train crops may use all of it."""
        return self.size if self.crop_pct >= 1 else math.floor(self.size / self.crop_pct)


def interpolation_mode(name: str) -> InterpolationMode:
    """Map timm's interpolation name to torchvision's enum (unknown names fall back to bilinear)."""
    return _INTERP.get(name, InterpolationMode.BILINEAR)


def check_channels(channels: int, spec: InputSpec) -> None:
    """Greyscale can be repeated to fit an RGB backbone; any other mismatch is a config error
    (backbone.in_chans follows data.channels unless overridden)."""
    if channels == spec.in_chans or (channels == 1 and spec.in_chans == 3):
        return
    raise ConfigError(
        f"data has {channels} channel(s) but backbone.in_chans={spec.in_chans}: "
        f"set backbone.in_chans={channels} or drop that override (it follows data.channels)"
    )


def resize_cached(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to spec.store_size once, when prepared, so batches need no resize."""
    size = spec.store_size
    if images.shape[-2:] == (size, size):
        return images
    out = v2.functional.resize(
        images,
        [size, size],
        interpolation=interpolation_mode(spec.interpolation),
        antialias=True,
    )
    return out.to(torch.uint8)


@dataclass(frozen=True)
class AugmentPreset:
    """Ranges for one batch-level augmentation preset (crop area, shift, rotation, erasing)."""

    scale: tuple[float, float]  # crop area as a fraction of the image
    translate: float  # max shift as a fraction of the side
    degrees: float  # max rotation
    erase_p: float  # chance of erasing one rectangle per image


PRESETS: dict[str, AugmentPreset | None] = {
    "none": None,
    "light": AugmentPreset(scale=(0.8, 1.0), translate=0.05, degrees=0.0, erase_p=0.0),
    "strong": AugmentPreset(scale=(0.5, 1.0), translate=0.1, degrees=15.0, erase_p=0.25),
}
AUGMENT_PRESETS = tuple(PRESETS)
_GRID_MODE = {"nearest": "nearest", "bicubic": "bicubic"}  # anything else: bilinear


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor onto `device` without waiting for it: a blocking copy to a GPU waits for
    every kernel queued before it (a host sync per batch); the non-blocking one returns once the
    bytes are staged, so the values are the same."""
    return t if t.device == device else t.to(device, non_blocking=True)


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high)


def random_crop_affine(x: torch.Tensor, p: AugmentPreset, interpolation: str, size: int | None = None) -> torch.Tensor:
    """Random resized crop (from the whole stored image) + shift + rotation, output `size`
    square, per-sample params in one grid_sample.

    torchvision's v2 ops draw one set of params per call, so on a batch every image would get
    the same crop; looping per image costs ~3 ms each. This keeps augmentation per sample.
    Params are drawn on the CPU generator wherever x lives, so CPU and GPU see the same crops.
    """
    b = x.shape[0]
    area = _uniform(b, *p.scale)
    ratio = torch.exp(_uniform(b, math.log(3 / 4), math.log(4 / 3)))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx = _uniform(b, -1, 1) * (1 - w) + _uniform(b, -2, 2) * p.translate
    cy = _uniform(b, -1, 1) * (1 - h) + _uniform(b, -2, 2) * p.translate
    angle = _uniform(b, -1, 1) * math.radians(p.degrees)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * w, -sin * h, cx], 1), torch.stack([sin * w, cos * h, cy], 1)], 1)
    out = [b, x.shape[1], size or x.shape[2], size or x.shape[3]]
    grid = F.affine_grid(to_device(theta, x.device).to(x.dtype), out, align_corners=False)
    mode = _GRID_MODE.get(interpolation, "bilinear")
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_erase(x: torch.Tensor, p: float, area=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Zero one random rectangle per image with probability p (RandomErasing, per sample)."""
    b, _, height, width = x.shape
    a = _uniform(b, *area) * height * width
    r = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1])))
    eh = (a * r).sqrt().round().clamp(1, height).long()
    ew = (a / r).sqrt().round().clamp(1, width).long()
    top = (torch.rand(b) * (height - eh + 1)).long()
    left = (torch.rand(b) * (width - ew + 1)).long()
    chosen = torch.rand(b) < p
    top, left, eh, ew, chosen = (to_device(t, x.device) for t in (top, left, eh, ew, chosen))
    rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    in_r = (rows[None] >= top[:, None]) & (rows[None] < (top + eh)[:, None])
    in_c = (cols[None] >= left[:, None]) & (cols[None] < (left + ew)[:, None])
    mask = in_r[:, :, None] & in_c[:, None, :] & chosen[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """timm's eval crop: the centre `size` square of the stored image."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


class BatchTransform:
    """uint8 [B, C, S, S] -> normalised float [B, in_chans, size, size]: a random crop (and the
    preset's augmentation) for training, timm's centre crop otherwise; greyscale repeated.

    The same object runs as the DataLoader's collate_fn (CPU: workers share the float work) or
    after the batch reached the GPU (`TransferDataModule.on_after_batch_transfer`). A picklable
    class (not a closure) so it works with num_workers > 0.
    """

    def __init__(self, spec: InputSpec, preset: str = "none", memory_format=torch.contiguous_format) -> None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown data.augment={preset!r}: use one of {', '.join(AUGMENT_PRESETS)}")
        self.spec = spec
        self.preset = PRESETS[preset]
        self.memory_format = memory_format
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, copied once

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return self.normalise(images), labels.long()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, S, S] on any device -> float32 normalised on that device."""
        x = x.float() / 255.0
        if self.preset is not None:
            x = random_crop_affine(x, self.preset, self.spec.interpolation, self.spec.size)
        else:
            x = center_crop(x, self.spec.size)
        if x.shape[1] == 1 and self.spec.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.device not in self._stats:
            self._stats[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self._stats[x.device]
        x = (x - mean) / std
        if self.preset is not None and self.preset.erase_p > 0:
            x = random_erase(x, self.preset.erase_p)
        return x.contiguous(memory_format=self.memory_format)


def as_uint8_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn when the transform runs on the device: uint8 images stay uint8 (4x fewer bytes
    to pin and copy than float32)."""
    images, labels = batch
    return images, labels.long()
