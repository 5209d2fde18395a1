"""Parameter-efficient routes: train a few parameters per task, store little per task.

- BitFit (`finetune=bitfit`, Ben Zaken et al. 2022): only biases and normalisation parameters.
- LoRA (`finetune=lora`, Hu et al. 2021) through the `peft` library (`pip install
  'transferlab[peft]'`): a low-rank update B·A beside every Linear and (non-grouped) Conv2d of the
  backbone; only A and B train, and after training they are merged back, so the logged model is a
  plain timm model.

Both act inside the stages that freezing leaves trainable (`freeze_depth`, `trainable_stages`);
the head always trains. BatchNorm running statistics of trainable stages still follow the target,
as in fine-tuning.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from transferlab import tags
from transferlab.data import InputSpec
from transferlab.errors import ConfigError
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages

NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm)


def _is_norm(module: nn.Module) -> bool:
    # timm's own norms (RmsNorm, FrozenBatchNorm2d, ...) do not all subclass torch's.
    return isinstance(module, NORMS) or "norm" in type(module).__name__.lower()


def bitfit_params(backbone: nn.Module) -> frozenset[str]:
    """Names of every bias and every parameter of a normalisation layer."""
    names = set()
    for name, module in backbone.named_modules():
        prefix = f"{name}." if name else ""
        for pname, _ in module.named_parameters(recurse=False):
            if pname == "bias" or _is_norm(module):
                names.add(prefix + pname)
    return frozenset(names)


def lora_targets(backbone: nn.Module) -> list[str]:
    """Every plain Linear and Conv2d with groups=1. Subclasses (timm's Conv2dSame pads in forward,
    StdConv2d standardises its weight) and depthwise convs are left alone: a plain adapter beside
    them would not match their output shape or merge exactly."""
    return [
        name
        for name, module in backbone.named_modules()
        if type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)
    ]


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> frozenset[str]:
    """Inject LoRA adapters in place (names keep their prefixes, so timm's stage grouping still
    applies); returns the adapter parameter names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ConfigError("finetune=lora needs the peft library: pip install 'transferlab[peft]'") from err
    targets = lora_targets(backbone)
    if not targets:
        raise ConfigError(f"{type(backbone).__name__} has no plain Linear/Conv2d layer for LoRA: use finetune=bitfit")
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"  # a str is matched in full by peft
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    inject_adapter_in_model(config, backbone)
    return frozenset(n for n, _ in backbone.named_parameters() if ".lora_" in n)


def merge_lora(backbone: nn.Module) -> None:
    """Fold every adapter into its base layer (W + scale·B·A) and put the base layer back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, module.get_base_layer())


def _module(cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int) -> TransferModule:
    shape = (spec.in_chans, spec.size, spec.size)
    return TransferModule(backbone, map_stages(backbone), num_classes, shape, cfg.finetune, cfg.optim)


def build_bitfit(cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int):
    module = _module(cfg, backbone, spec, num_classes)
    module.only_params = bitfit_params(module.backbone)
    return module, {}


def build_lora(cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int):
    lora = cfg.finetune.lora
    names = add_lora(backbone, int(lora.rank), float(lora.alpha), float(lora.dropout))
    module = _module(cfg, backbone, spec, num_classes)
    module.only_params = names
    return module, {tags.LORA_LAYERS: str(len({n.split(".lora_")[0] for n in names}))}


def finalize_lora(module: TransferModule) -> None:
    merge_lora(module.backbone)


def validate_lora(cfg: DictConfig) -> None:
    lora = cfg.finetune.get("lora")
    if lora is None or int(lora.rank) < 1 or float(lora.alpha) <= 0 or not 0 <= float(lora.dropout) < 1:
        raise ConfigError("finetune.lora needs rank >= 1, alpha > 0 and dropout in [0, 1): e.g. finetune=lora")
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ConfigError("finetune=lora needs the peft library: pip install 'transferlab[peft]'") from err
