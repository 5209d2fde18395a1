"""Freeze policy and the freeze-then-unfreeze schedule, as pure functions of the config.

A run is a list of phases; each phase trains a fixed set of stages and runs as its own
`Trainer.fit` with a fresh optimizer. That keeps DDP correct (Lightning re-wraps the model at
each fit, so newly unfrozen parameters are synchronised: Lightning #20340) and never adds
param groups to a live optimizer (which breaks torch schedulers). The learning rate is one
function of the global step, so it is continuous across the switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from transferlab.errors import ConfigError
from transferlab.transfer.names import SCHEDULES
from transferlab.transfer.stages import StageMap


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trainable: frozenset[int]  # backbone stage indices trained; the head always trains
    patience: int | None = None  # end the phase early when val loss stalls this long


def target_trainable(cfg: DictConfig, stages: StageMap, kept: int) -> frozenset[int]:
    """Stages trained once fully unfrozen: `trainable_stages` if given, else all past `freeze_depth`.

    `kept` is the number of stages left after truncation.
    """
    if cfg.trainable_stages is not None:
        chosen = frozenset(stages.index(s) for s in cfg.trainable_stages)
        if dropped := [stages.names[i] for i in chosen if i >= kept]:
            raise ConfigError(
                f"finetune.trainable_stages names {dropped}, which truncation removes: "
                "lower finetune.truncate_after or drop them"
            )
        return chosen
    depth = cfg.freeze_depth
    if depth == "all":
        return frozenset()
    if not isinstance(depth, int) or not 0 <= depth <= len(stages.names):
        raise ConfigError(f"finetune.freeze_depth={depth!r} is invalid: use 0..{len(stages.names)} or 'all'")
    return frozenset(range(depth, kept))


def plan_phases(cfg: DictConfig, max_epochs: int, target: frozenset[int], scale: int = 1) -> list[Phase]:
    """Head-only warm-up, then (optionally gradual, deepest stage first) unfreezing.

    `scale`: how many epochs make one configured epoch when small data gets more epochs
    (`trainer.min_steps`), so head/gradual phases keep their share of training.
    """
    head_epochs = int(cfg.head_epochs or 0) * scale
    if not target or head_epochs == 0 and not cfg.gradual:
        return [Phase("train", max_epochs, target)]
    if head_epochs >= max_epochs:
        raise ConfigError(
            f"finetune.head_epochs={cfg.head_epochs} leaves no epoch to fine-tune within "
            f"trainer.max_epochs={max_epochs // scale}: lower one or raise the other"
        )
    # EarlyStopping counts validation checks, which already run once per `scale` epochs.
    phases = [Phase("head", head_epochs, frozenset(), cfg.head_patience)] if head_epochs else []
    left = max_epochs - head_epochs
    if cfg.gradual:
        order = sorted(target, reverse=True)
        every = int(cfg.gradual_every) * scale
        for count in range(1, len(order)):
            if left <= every:
                break
            phases.append(Phase(f"unfreeze{count}", every, frozenset(order[:count])))
            left -= every
    phases.append(Phase("finetune", left, target))
    return phases


def stage_lr_mults(cfg: DictConfig, stage_count: int) -> list[float]:
    """LR multiplier of each backbone stage relative to the head (which gets 1.0).

    Pretrained stages get `backbone_lr_mult`; `layer_decay` shrinks it further per stage
    toward the stem, so early generic features move least.
    """
    decay = 1.0 if cfg.layer_decay is None else float(cfg.layer_decay)
    if not 0 < decay <= 1:
        raise ConfigError(f"finetune.layer_decay={decay} must lie in (0, 1]")
    mult = float(cfg.backbone_lr_mult)
    if mult < 0:
        raise ConfigError(f"finetune.backbone_lr_mult={mult} must be >= 0")
    return [mult * decay ** (stage_count - 1 - i) for i in range(stage_count)]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Schedule value in [0, 1] at a global optimizer step: linear warm-up then cosine/constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ConfigError(f"optim.schedule={schedule!r} is unknown: use {' or '.join(SCHEDULES)}")


SELECT = ("best", "last")


class BestWeights(pl.Callback):
    """Ends a phase on its best validation weights (lowest `val/loss`), buffers included, so an
    early-stopped head phase hands its best head to the unfreeze and the test sees the best
    model (finetuning-scheduler's `restore_best`). `select=last` keeps the final weights."""

    def __init__(self, select: str = "best") -> None:
        if select not in SELECT:
            raise ConfigError(f"finetune.select={select!r} is unknown: use {' or '.join(SELECT)}")
        self.select = select
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None or not float(loss) < self.best_loss:
            return
        self.best_loss, self.best_epoch = float(loss), trainer.current_epoch
        if self.select == "best":
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)

    def state_dict(self) -> dict:
        """Kept in epoch checkpoints: a phase resumed after a kill still ends on its best weights."""
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "weights": self._state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_loss, self.best_epoch, self._state = (
            state_dict["best_loss"],
            state_dict["best_epoch"],
            state_dict["weights"],
        )
