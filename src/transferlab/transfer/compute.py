"""Freeze-aware compute accounting: FLOPs per sample, wall time, peak memory.

Forward FLOPs are counted once on the real model and input size; training FLOPs are derived from
the freeze state, because FlopCounterMode's backward numbers overcount depthwise convs ~x groups
and CPU fused attention counts as 0.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class LayerCost:
    """Forward cost of one module, excluding its children."""

    name: str
    flops: float
    has_params: bool


def _owns_params(module: torch.nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def layer_costs(model: torch.nn.Module, example: torch.Tensor) -> list[LayerCost]:
    """Self FLOPs per sample of every module that computes or owns parameters, in execution order.

    Each module is charged the counter's increase while it is the innermost running module, so
    work its forward does between child calls (attention matmuls) is its own. A module's place in
    the order is where it first does counted work (where it is entered, if it does none): timm's
    Attention then sorts after its qkv Linear, whose output its matmuls consume. Modules that own
    parameters are kept even at 0 FLOPs (BatchNorm, a ViT's pos_embed): where trainable parameters
    sit decides which layers need a backward.
    """
    modes = {m: m.training for m in model.modules()}
    # timm Attention: SDPA counts as 0 FLOPs on CPU, so count the explicit matmul path instead.
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    names = {m: n for n, m in model.named_modules()}
    flops = dict.fromkeys(names, 0.0)
    entered: dict[torch.nn.Module, int] = {}
    first_work: dict[torch.nn.Module, int] = {}
    stack: list[torch.nn.Module] = []
    ticks = itertools.count()
    counter = FlopCounterMode(display=False)
    last = 0.0

    def charge() -> None:
        nonlocal last
        total = float(counter.get_total_flops())
        if stack and total > last:
            flops[stack[-1]] += total - last
            first_work.setdefault(stack[-1], next(ticks))
        last = total

    def pre_hook(module: torch.nn.Module, args: Any) -> None:
        charge()
        entered.setdefault(module, next(ticks))
        stack.append(module)

    def post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        charge()
        stack.pop()

    handles = [m.register_forward_pre_hook(pre_hook) for m in names]
    handles += [m.register_forward_hook(post_hook, always_call=True) for m in names]
    try:
        for m in fused:
            m.fused_attn = False
        model.eval()
        with torch.no_grad(), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, f in fused.items():
            m.fused_attn = f
        for m, training in modes.items():
            m.train(training)
    batch = example.shape[0]
    kept = [m for m in entered if flops[m] > 0 or _owns_params(m)]
    kept.sort(key=lambda m: first_work.get(m, entered[m]))
    return [LayerCost(names[m], flops[m] / batch, _owns_params(m)) for m in kept]


def forward_flops(costs: list[LayerCost]) -> float:
    """Forward FLOPs per sample."""
    return sum(c.flops for c in costs)


def training_flops_per_sample(model: torch.nn.Module, costs: list[LayerCost]) -> float:
    """Forward + backward FLOPs per sample under the model's current requires_grad state.

    A layer costs F forward, F more for weight grads if it owns a trainable weight matrix or kernel,
    and F more for input grads if a trainable parameter was used before it: frozen layers below every
    trainable one need no backward. A trainable bias or norm scale alone costs ~0 (a sum over the
    output gradient), but makes every layer after it pay input grads (BitFit; a frozen base layer
    under a LoRA adapter). Full fine-tune is ~3x forward, head only ~1x.
    """
    modules = dict(model.named_modules())
    total, below = 0.0, False
    for cost in costs:
        own = [p for p in modules[cost.name].parameters(recurse=False) if p.requires_grad]
        weight_grads = any(p.ndim > 1 for p in own)
        total += cost.flops * (1 + weight_grads + below)
        below = below or bool(own)
    return total


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> bool:
    """Start a job's peak-memory window, so each job of a sweep reports its own peak, not the
    process's maximum so far. CUDA: reset_peak_memory_stats; RSS (Linux): writing "5" to
    /proc/self/clear_refs resets VmHWM. False where RSS cannot be reset (the peak is then the
    process's)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory and peak CUDA allocation (0 without CUDA) since `reset_peak_memory`."""
    rss_mb = _vm_hwm_mb()
    if rss_mb is None:  # no /proc: the process's peak
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"rss_peak_mb": rss_mb, "cuda_peak_mb": cuda_mb}


class FitTimer(pl.Callback):
    """Wall time and training samples over one or more `trainer.fit` calls (accumulates), and the
    samples evaluated (validation and test forward passes, counted for `compute/eval_flops`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self.eval_samples = 0
        self._start: float | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.samples += extract_batch_size(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.eval_samples += extract_batch_size(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.eval_samples += extract_batch_size(batch)
