"""Transfer routes: how a job's module is built, picked by `finetune.strategy` from a registry
(as optimizers are picked from `model.OPTIMIZERS`). Every other strategy name (fine_tune, probe,
scratch, ...) is the standard route: freeze depth, truncation and phases alone say what trains.
Each route reads the same stage map (`stages.map_stages`) and backbone (`weights.build_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig
from torch import nn

from transferlab.data import InputSpec
from transferlab.transfer import distill, param_efficient
from transferlab.transfer.distill import TeacherWeights
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages

Built = tuple[TransferModule, dict[str, str]]  # the module and tags for its run


def standard(cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int, teacher=None) -> Built:
    shape = (spec.in_chans, spec.size, spec.size)
    return TransferModule(backbone, map_stages(backbone), num_classes, shape, cfg.finetune, cfg.optim), {}


@dataclass(frozen=True)
class Route:
    build: Callable[..., Built]  # (cfg, backbone, spec, num_classes, teacher weights or None)
    validate: Callable[[DictConfig], None] = lambda cfg: None
    finalize: Callable[[TransferModule], None] = lambda module: None  # before the model is saved


STANDARD = Route(standard)
ROUTES: dict[str, Route] = {
    "distill": Route(distill.build, distill.validate),
    "bitfit": Route(lambda cfg, bb, spec, n, teacher=None: param_efficient.build_bitfit(cfg, bb, spec, n)),
    "lora": Route(
        lambda cfg, bb, spec, n, teacher=None: param_efficient.build_lora(cfg, bb, spec, n),
        param_efficient.validate_lora,
        param_efficient.finalize_lora,
    ),
}


def route_for(cfg: DictConfig) -> Route:
    return ROUTES.get(str(cfg.finetune.strategy), STANDARD)


def build_module(
    cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int, teacher: TeacherWeights | None = None
) -> Built:
    """The job's TransferModule (weights already loaded into `backbone`) and its route's tags.
    Upstream models (a distillation teacher) are resolved by the job beforehand and handed in."""
    return route_for(cfg).build(cfg, backbone, spec, num_classes, teacher)
