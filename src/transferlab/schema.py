"""The typed fields of the config: type, range or choices, and an example fix, in one table.

`check_fields` runs on every composed config before any job of a sweep starts (cli, train.run),
so runtime code may assume these hold; `FIELDS` also lists the valid names (for did-you-mean).
Fields are read where they are used; only their validity lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from transferlab.errors import ConfigError
from transferlab.transfer.names import OPTIMIZERS, SCHEDULES


@dataclass(frozen=True)
class Field:
    kind: type  # int, float, str or object (float accepts ints; bools are never numbers)
    ok: Callable[[Any], bool] = lambda v: True
    rule: str = ""  # what `ok` requires, said to the user
    example: str = ""
    nullable: bool = False
    needs: str = ""  # the override that brings a route's own field into the config (finetune=distill)


def _choice(*values: str) -> Field:
    return Field(str, lambda v: v in values, f"one of {' | '.join(values)}", values[0])


def _int(low: int, example: int, nullable: bool = False) -> Field:
    return Field(int, lambda v: v >= low, f"an integer >= {low}", str(example), nullable)


def _float(rule: str, ok: Callable[[float], bool], example: float, nullable: bool = False) -> Field:
    return Field(float, lambda v: math.isfinite(v) and ok(v), rule, str(example), nullable)


def _numbers(rule: str, ok: Callable[[float], bool], example: str) -> Field:
    """A list of numbers (one per channel beyond RGB), or null."""
    fits = lambda v: all(_typed(x, float) and math.isfinite(x) and ok(x) for x in v)  # noqa: E731
    return Field(object, lambda v: isinstance(v, ListConfig | list) and bool(v) and fits(v), rule, example, True)


def _depth() -> Field:
    ok = lambda v: v == "all" or (isinstance(v, int) and v >= 0)  # noqa: E731
    return Field(object, ok, "an integer >= 0 or 'all'", "2")


FIELDS: dict[str, Field] = {
    "seed": _int(0, 0),
    "optim.name": _choice(*OPTIMIZERS),
    "optim.schedule": _choice(*SCHEDULES),
    "finetune.freeze_depth": _depth(),
    "finetune.temperature": replace(
        _float("a number > 0 (Hinton et al. use 1-20; timm 4)", lambda v: v > 0, 4), needs="finetune=distill"
    ),
    "finetune.alpha": replace(
        _float("a number in [0, 1] (the soft-target weight)", lambda v: 0 <= v <= 1, 0.5), needs="finetune=distill"
    ),
    "optim.lr": _float("a number > 0", lambda v: v > 0, 0.001),
    "optim.weight_decay": _float("a number >= 0", lambda v: v >= 0, 0.0001),
    "optim.momentum": _float("a number in [0, 1)", lambda v: 0 <= v < 1, 0.9),
    "optim.warmup_epochs": _int(0, 1),
    "optim.at_unfreeze": _choice("reset", "carry"),
    "optim.rewarm_epochs": _float("a number >= 0", lambda v: v >= 0, 0.5),
    "finetune.head_lr_mult": _float("a number > 0", lambda v: v > 0, 10),
    "finetune.backbone_lr_mult": _float("a number >= 0", lambda v: v >= 0, 0.1),
    "finetune.layer_decay": _float("a number in (0, 1] or null", lambda v: 0 < v <= 1, 0.7, nullable=True),
    "finetune.head_epochs": _int(0, 2, nullable=True),
    "finetune.head_patience": _int(1, 3, nullable=True),
    "finetune.gradual_every": _int(1, 1),
    "finetune.select": _choice("best", "last"),
    "finetune.cache_features": _choice("auto", "unaugmented", "off"),
    "finetune.head_solver": _choice("sgd", "lbfgs"),
    "finetune.head.dropout": _float("a number in [0, 1)", lambda v: 0 <= v < 1, 0.1),
    "trainer.max_epochs": _int(1, 6),
    "trainer.min_steps": _int(0, 60, nullable=True),
    "trainer.stop_after_epochs": _int(1, 2, nullable=True),
    "tracking.save_every_s": _float("a number of seconds >= 0", lambda v: v >= 0, 30),
    "trainer.num_nodes": _int(1, 1),
    "data.batch_size": _int(1, 64),
    "data.num_workers": _int(0, 0, nullable=True),
    "data.split_seed": _int(0, 0),
    "data.channels": _int(1, 4),
    "data.extra_mean": _numbers("a list of numbers, one per channel beyond RGB", lambda v: True, "[0.5]"),
    "data.extra_std": _numbers("a list of numbers > 0, one per channel beyond RGB", lambda v: v > 0, "[0.25]"),
}


_ABSENT = object()


def _typed(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def check_fields(cfg: DictConfig, fields: dict[str, Field] = FIELDS) -> None:
    """Raise one line naming the first field whose value has the wrong type or range, and a fix."""
    for path, spec in fields.items():
        value = OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT or value is None and spec.nullable:  # a config without that group
            continue
        if value is None or not _typed(value, spec.kind) or not spec.ok(value):
            raise ConfigError(f"{path}={value!r} is invalid: use {spec.rule}, e.g. {path}={spec.example}")
