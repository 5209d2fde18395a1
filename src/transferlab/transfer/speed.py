"""Trainer options that depend on the device: precision, determinism, memory format, compile.

`auto` picks what is fast and safe where the job runs: bf16 autocast and non-deterministic
(fast) kernels on a GPU, fp32 and deterministic kernels on a CPU (tests stay reproducible)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from transferlab.errors import ConfigError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def on_gpu(cfg: DictConfig) -> bool:
    """Whether `trainer.accelerator` resolves to a CUDA device."""
    accelerator = str(cfg.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def precision(cfg: DictConfig) -> str:
    """`auto` = bf16-mixed on a GPU (fp32 master weights, bf16 matmuls/convs), 32-true on CPU."""
    value = str(cfg.get("precision", "auto"))
    if value != "auto":
        return value
    return "bf16-mixed" if on_gpu(cfg) else "32-true"


def deterministic(cfg: DictConfig) -> bool:
    """`auto` = deterministic on CPU only: deterministic CUDA kernels (cuDNN, scatter) cost speed."""
    value = cfg.get("deterministic", "auto")
    return not on_gpu(cfg) if value == "auto" else bool(value)


def validate_speed_config(cfg: DictConfig) -> None:
    if str(cfg.get("precision", "auto")) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
    if cfg.get("deterministic", "auto") not in ("auto", True, False):
        raise ConfigError(f"trainer.deterministic={cfg.deterministic!r}: use auto, true or false")
    if not isinstance(cfg.get("channels_last", False), bool):
        raise ConfigError(f"trainer.channels_last={cfg.get('channels_last')!r} must be true or false")
    backend = cfg.get("compile", False)
    if not isinstance(backend, bool) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(
            f"trainer.compile={backend!r}: use true, false or a torch.compile backend "
            f"({', '.join(torch._dynamo.list_backends())}, aot_eager)"
        )


def apply_speedups(module: torch.nn.Module, data, cfg: DictConfig) -> None:
    """channels_last for model and batches; `compile` (true or a backend name) compiles the module
    in place (`nn.Module.compile`: parameter names and state_dict keys stay as they are)."""
    if cfg.get("channels_last", False):
        module.to(memory_format=torch.channels_last)
        data.memory_format = torch.channels_last
    backend = cfg.get("compile", False)
    if backend:
        module.compile(**({} if backend is True else {"backend": backend}))
