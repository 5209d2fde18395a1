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

from transferlab import distill, param_efficient
from transferlab.data import InputSpec
from transferlab.model import TransferModule
from transferlab.stages import map_stages

Built = tuple[TransferModule, dict[str, str]]  # the module and tags for its run


def standard(cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int) -> Built:
    shape = (spec.in_chans, spec.size, spec.size)
    return TransferModule(backbone, map_stages(backbone), num_classes, shape, cfg.finetune, cfg.optim), {}


@dataclass(frozen=True)
class Route:
    build: Callable[[DictConfig, nn.Module, InputSpec, int], Built]
    validate: Callable[[DictConfig], None] = lambda cfg: None
    finalize: Callable[[TransferModule], None] = lambda module: None  # before the model is saved


STANDARD = Route(standard)
ROUTES: dict[str, Route] = {
    "distill": Route(distill.build, distill.validate),
    "bitfit": Route(param_efficient.build_bitfit),
    "lora": Route(param_efficient.build_lora, param_efficient.validate_lora, param_efficient.finalize_lora),
}


def route_for(cfg: DictConfig) -> Route:
    return ROUTES.get(str(cfg.finetune.strategy), STANDARD)


def build_module(cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int) -> Built:
    """The job's TransferModule (weights already loaded into `backbone`) and its route's tags."""
    return route_for(cfg).build(cfg, backbone, spec, num_classes)
