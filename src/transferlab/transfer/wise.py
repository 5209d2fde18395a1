"""WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903): after a fine-tune, evaluate weight-space
interpolations between the starting and the fine-tuned backbone, without more training.

`finetune.wise_alphas=[0.0,0.25,0.5,0.75,1.0]`: alpha 0 is the starting backbone, 1 the fine-tuned
one; the head is always the fine-tuned head. Each alpha's val and test metrics are logged at
step = its index; the alpha with the best val accuracy becomes the run's result and its model.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from transferlab.errors import ConfigError
from transferlab.transfer.module import TransferModule


def validate(cfg: DictConfig) -> None:
    alphas = list(cfg.get("wise_alphas") or [])
    if any(not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"finetune.wise_alphas={alphas} must be numbers in [0, 1], e.g. [0.0,0.5,1.0]")


def snapshot(module: TransferModule) -> dict[str, torch.Tensor]:
    """The starting backbone (after truncation, before any training)."""
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) * start + alpha * end for floating tensors (weights, BN statistics); integer
    buffers (BN's num_batches_tracked) come from the fine-tuned side."""
    return {
        k: torch.lerp(start[k].to(v.dtype), v, float(alpha)) if v.is_floating_point() else v for k, v in end.items()
    }


def evaluate(
    module: TransferModule,
    start: dict[str, torch.Tensor],
    alphas: list[float],
    trainer: pl.Trainer,
    datamodule: pl.LightningDataModule,
) -> tuple[list[dict[str, float]], int]:
    """Val and test metrics per alpha, and the index of the best val accuracy (ties: lower val
    loss). Leaves the best interpolation loaded in `module`."""
    end = snapshot(module)
    results = []
    for alpha in alphas:
        module.backbone.load_state_dict(interpolate(start, end, alpha))
        val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        results.append({k: float(v) for k, v in (val | test).items()})
    best = max(range(len(alphas)), key=lambda i: (results[i]["val/acc"], -results[i]["val/loss"]))
    module.backbone.load_state_dict(interpolate(start, end, alphas[best]))
    return results, best


def wise_metrics(
    module: TransferModule,
    start: dict[str, torch.Tensor],
    alphas: list[float],
    trainer: pl.Trainer,
    datamodule: pl.LightningDataModule,
    log,
    forward_flops_per_sample: float,
    eval_samples: int,
) -> dict[str, float]:
    """Run `evaluate`, log each alpha (`wise/*`, step = alpha index) through `log(metrics, step)`,
    and return the run's result: the best alpha's test metrics and the evaluations' cost."""
    began = time.perf_counter()
    results, best = evaluate(module, start, [float(a) for a in alphas], trainer, datamodule)
    for i, (alpha, result) in enumerate(zip(alphas, results)):
        log({"wise/alpha": float(alpha)} | {f"wise/{k.replace('/', '_')}": v for k, v in result.items()}, i)
    return {k: v for k, v in results[best].items() if k.startswith("test/")} | {
        "wise/best_alpha": float(alphas[best]),
        "wise/best_index": float(best),
        "compute/wise_seconds": time.perf_counter() - began,
        "compute/wise_eval_flops": forward_flops_per_sample * eval_samples * len(alphas),
    }
