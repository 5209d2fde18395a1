"""Ordered, named stages of any timm backbone, from timm's own parameter grouping.

A stage is one coarse group of `model.group_matcher(coarse=True)`: stage 0 is the stem, the
rest follow the forward order. Freezing, truncation, per-stage LRs and the stage table all
use this one map, so no architecture needs a hand-written table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models import group_parameters

from transferlab.errors import ConfigError


@dataclass(frozen=True)
class StageMap:
    """Where each parameter and module of a backbone sits, by stage index."""

    names: tuple[str, ...]
    param_stage: dict[str, int]
    module_stage: dict[str, int]
    feature_index: dict[int, int]  # stage -> timm feature index of its output, where it has one

    def index(self, ref: int | str) -> int:
        """Resolve a stage given by index or name (`stem`, `stage3`, `-1` for the last)."""
        if isinstance(ref, str) and ref.lstrip("-").isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            if -len(self.names) <= ref < len(self.names):
                return ref % len(self.names)
        elif ref in self.names:
            return self.names.index(ref)
        raise ConfigError(f"unknown stage {ref!r}: use an index 0..{len(self.names) - 1} or one of {list(self.names)}")

    def cut_point(self, ref: int | str) -> int:
        """Stage index to truncate after; it must have a timm feature output to pool. A depth
        given as a share (`75%`) means the same on every family: the deepest stage with a
        feature output at or before that share of the network (test_resnet: stage3 of stem..stage4;
        tf_efficientnet_lite0: stage5 of stem..stage7)."""
        if isinstance(ref, str) and ref.endswith("%"):
            return self._at_depth(ref)
        stage = self.index(ref)
        if stage not in self.feature_index:
            usable = [self.names[s] for s in sorted(self.feature_index)]
            raise ConfigError(
                f"finetune.truncate_after={self.names[stage]!r} has no feature output in this backbone: "
                f"use one of {usable}"
            )
        return stage

    def _at_depth(self, ref: str) -> int:
        try:
            share = float(ref[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ConfigError(
                f"finetune.truncate_after={ref!r} is invalid: use a share of the depth in (0%, 100%], e.g. 75%"
            )
        limit = int(share * (len(self.names) - 1) + 1e-9)
        usable = [s for s in sorted(self.feature_index) if 0 < s <= limit]
        if not usable:
            raise ConfigError(f"finetune.truncate_after={ref!r} lies before the first stage with a feature output")
        return usable[-1]

    def params_in(self, model: torch.nn.Module, stage: int) -> list[torch.nn.Parameter]:
        return [p for n, p in model.named_parameters() if self.param_stage.get(n) == stage]


def stage_names(count: int) -> tuple[str, ...]:
    return ("stem", *(f"stage{i}" for i in range(1, count)))


def map_stages(model: torch.nn.Module) -> StageMap:
    """Group a timm backbone (built with num_classes=0) into stages."""
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError) as err:
        raise ConfigError(
            f"{type(model).__name__} has no timm group_matcher, so its stages are unknown: "
            "pick a timm model that defines one (resnet, efficientnet, convnext, vit, regnet, ...)"
        ) from err
    param_stage = dict(group_parameters(model, matcher, reverse=True))
    count = max(param_stage.values()) + 1
    if count < 2:
        raise ConfigError(f"{type(model).__name__} groups into {count} stage: it cannot be frozen by depth")
    module_stage = _module_stages(model, param_stage)
    feature_index: dict[int, int] = {}
    for i, info in enumerate(getattr(model, "feature_info", []) or []):
        stage = module_stage.get(info.get("module", ""))
        if stage is not None:
            feature_index[stage] = i  # the last feature inside a stage is its output
    return StageMap(stage_names(count), param_stage, module_stage, feature_index)


def _module_stages(model: torch.nn.Module, param_stage: dict[str, int]) -> dict[str, int]:
    """Stage of every module: that of its first parameter; a parameter-free module (ReLU, pool)
    belongs to the stage of the last parameter before it in forward (registration) order."""
    stages: dict[str, int] = {}
    current = 0
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = next((param_stage[prefix + n] for n, _ in module.named_parameters()), None)
        stages[name] = current if own is None else own
        for n, _ in module.named_parameters(recurse=False):
            current = param_stage[prefix + n]
    return stages


def stage_table(
    model: torch.nn.Module, stages: StageMap, input_size: int, trainable: set[int] | None = None
) -> list[dict[str, object]]:
    """One row per stage: parameters, output channels and resolution at `input_size`."""
    infos = getattr(model, "feature_info", []) or []
    rows = []
    for index, name in enumerate(stages.names):
        params = sum(p.numel() for p in stages.params_in(model, index))
        feature = stages.feature_index.get(index)
        channels, resolution = "-", "-"
        if feature is not None and feature < len(infos):
            channels = infos[feature]["num_chs"]
            side = max(1, input_size // infos[feature]["reduction"])
            resolution = f"{side}x{side}"
        row = {"stage": name, "params": params, "channels": channels, "resolution": resolution}
        if trainable is not None:
            row["state"] = "trainable" if index in trainable else "frozen"
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Plain Markdown table, readable in a terminal and in an MLflow artifact."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
