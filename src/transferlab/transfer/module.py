"""TransferModule: a timm backbone cut into stages, a fresh head, per-stage LRs and freezing."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.modules.batchnorm import _NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from transferlab.errors import ConfigError
from transferlab.transfer.schedule import lr_factor, stage_lr_mults
from transferlab.transfer.stages import StageMap

# optim.name -> builder(param_groups, optim config); `config.validate` checks names against it.
OPTIMIZERS = {
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, weight_decay=cfg.weight_decay),
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
}


def build_head(width: int, cfg: DictConfig, num_classes: int) -> nn.Sequential:
    """Freshly initialised classifier, with optional hidden layers (Linear-ReLU-Dropout)."""
    layers: list[nn.Module] = []
    for hidden in cfg.hidden or []:
        layers += [nn.Linear(width, int(hidden)), nn.ReLU(), nn.Dropout(float(cfg.dropout))]
        width = int(hidden)
    if cfg.dropout and not cfg.hidden:
        layers.append(nn.Dropout(float(cfg.dropout)))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def frozen_modules(backbone: nn.Module, stages: StageMap, trainable: frozenset[int]) -> list[nn.Module]:
    """Modules to keep in eval mode: every module whose whole subtree lies in frozen stages
    (dropout, drop-path, BatchNorm, containers that branch on `self.training`), plus every norm
    layer with running stats whose own stage is frozen, whatever its children: timm's
    `BatchNormAct2d` has child modules (`drop`, `act`), so a leaf-only selection misses it."""
    stage_of = stages.module_stage
    out = []
    for name, module in backbone.named_modules():
        prefix = f"{name}." if name else ""
        own = stage_of.get(name, 0)
        subtree = {own} | {stage_of.get(prefix + child, own) for child, _ in module.named_modules() if child}
        if not subtree & trainable or (isinstance(module, _NormBase) and own not in trainable):
            out.append(module)
    return out


class TransferModule(pl.LightningModule):
    """Backbone (optionally truncated after a stage) + new head, trained phase by phase.

    `set_trainable` applies a phase: frozen stages get requires_grad=False and their modules
    stay in eval mode (BatchNorm running stats fixed, dropout off) even inside `train()`.
    """

    teacher_flops_per_sample = 0.0  # training FLOPs outside forward(): a distillation teacher
    teacher_fit_flops = 0.0  # the teacher's own training, where known (not part of this run's cost)
    only_params: frozenset[str] | None = None  # a route's subset of backbone params (BitFit, LoRA)

    def __init__(
        self,
        backbone: nn.Module,
        stages: StageMap,
        num_classes: int,
        input_shape: tuple[int, int, int],
        finetune: DictConfig,
        optim: DictConfig,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = stages
        self.optim_cfg = optim
        self.head_lr = float(optim.lr) * float(finetune.head_lr_mult)
        self.feature_index: int | None = None
        self.on_features = False  # features.py: batches hold cached backbone outputs, not images
        self.kept = len(stages.names)
        if finetune.truncate_after is not None:
            self._truncate(stages.cut_point(finetune.truncate_after))
        # Probe the width in eval mode: a train-mode forward would move BatchNorm running stats.
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            width = self.features(torch.zeros(2, *input_shape)).shape[-1]
        self.backbone.train(was_training)
        self.head = build_head(width, finetune.head, num_classes)
        self.lr_mults = stage_lr_mults(finetune, self.kept)
        self.trainable: frozenset[int] = frozenset(range(self.kept))
        self._frozen_modules: list[nn.Module] = []
        # The LR schedule spans all phases; the runner sets where the current phase starts and
        # how many epochs make one configured epoch (small data gets more, finetune.plan_phases).
        self.total_epochs = 1
        self.epoch_offset = 0
        self.epoch_scale = 1
        self._carried_state: dict[nn.Parameter, dict] = {}  # optim.at_unfreeze=carry
        metrics = {"num_classes": num_classes}
        # torchmetrics' MulticlassAccuracy defaults to macro (balanced) accuracy: ask for plain accuracy.
        self.train_acc = MulticlassAccuracy(average="micro", **metrics)
        self.val_acc = MulticlassAccuracy(average="micro", **metrics)
        self.test_acc = MulticlassAccuracy(average="micro", **metrics)
        self.test_f1 = MulticlassF1Score(average="macro", **metrics)

    def _truncate(self, stage: int) -> None:
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ConfigError(
                f"{type(self.backbone).__name__} cannot be truncated (no forward_intermediates): "
                "set finetune.truncate_after=null"
            )
        self.feature_index = self.stages.feature_index[stage]
        self.backbone.prune_intermediate_layers(indices=[self.feature_index], prune_norm=True, prune_head=True)
        self.kept = stage + 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_index is None:
            return self.backbone(x)  # num_classes=0: pooled pre-logits
        (fmap,) = self.backbone.forward_intermediates(x, indices=[self.feature_index], intermediates_only=True)
        return fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x if self.on_features else self.features(x))

    # --- freezing -------------------------------------------------------------------------
    def set_trainable(self, stages: frozenset[int]) -> None:
        self.trainable = frozenset(stages)
        for name, param in self.backbone.named_parameters():
            chosen = self.only_params is None or name in self.only_params
            param.requires_grad_(chosen and self.stages.param_stage[name] in self.trainable)
        self.head.requires_grad_(True)
        self._frozen_modules = frozen_modules(self.backbone, self.stages, self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferModule:
        super().train(mode)
        for module in getattr(self, "_frozen_modules", []):
            module.training = False  # not .train(False): that would recurse into trainable children
        return self

    # --- optimisation ---------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Per kept stage plus the head, all built up front and named for logging; each split
        into weights and `<name>.no_decay` (norm, bias, position/class tokens: timm's
        `param_groups_weight_decay` convention, weight decay 0)."""
        base = self.head_lr
        skip = set(getattr(self.backbone, "no_weight_decay", set)())
        named = {i: [] for i in range(self.kept)}
        for name, param in self.backbone.named_parameters():
            named[self.stages.param_stage[name]].append((name, param))
        named[None] = [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        groups = []
        for stage, params in named.items():
            label, lr = ("head", base) if stage is None else (self.stages.names[stage], base * self.lr_mults[stage])
            no_decay = [p for n, p in params if p.ndim <= 1 or n.endswith(".bias") or n in skip]
            decay = [p for n, p in params if not any(p is q for q in no_decay)]
            groups.append({"name": label, "params": decay, "lr": lr, "stage": stage})
            groups.append(
                {"name": f"{label}.no_decay", "params": no_decay, "lr": lr, "stage": stage, "weight_decay": 0.0}
            )
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = OPTIMIZERS[cfg.name](self.param_groups(), cfg)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // self.trainer.max_epochs)
        total = steps_per_epoch * self.total_epochs
        offset = steps_per_epoch * self.epoch_offset
        warmup = steps_per_epoch * int(cfg.warmup_epochs) * self.epoch_scale
        # A later phase starts with fresh AdamW moments (optim.at_unfreeze=reset): its first
        # updates are ~lr x sign(grad) for every parameter, so it re-warms for a short while.
        rewarm = 0
        if self.epoch_offset > 0 and cfg.at_unfreeze == "reset":
            rewarm = max(1, round(steps_per_epoch * float(cfg.rewarm_epochs) * self.epoch_scale))
        if self.epoch_offset > 0 and cfg.at_unfreeze == "carry":
            for param, state in self._carried_state.items():
                optimizer.state[param] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

        def factor_for(group: dict):
            frozen = group["stage"] is not None and group["stage"] not in self.trainable

            def factor(step: int) -> float:
                ramp = min(1.0, (step + 1) / rewarm) if rewarm else 1.0
                return 0.0 if frozen else ramp * lr_factor(offset + step, total, warmup, cfg.schedule)

            return factor

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(g) for g in optimizer.param_groups])
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_end(self) -> None:
        """Keep AdamW moments for `optim.at_unfreeze=carry` (parameters stay the same objects)."""
        self._carried_state = {p: dict(st) for p, st in self.trainer.optimizers[0].state.items() if st}

    # --- steps ----------------------------------------------------------------------------
    def _step(self, batch, split: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # update(), not forward(): only the epoch value is logged, and forward() also computes a
        # per-batch value on a copy of the state (measured: benchmarks/RESULTS.md, the job's own tax)
        accuracy.update(logits.detach(), y)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, batch_size=len(y))
        if split == "test":
            self.test_f1.update(logits, y)
            self.log("test/f1", self.test_f1, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)
