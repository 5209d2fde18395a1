"""Compose and validate configs. Validation runs once, before any weights or data are loaded."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import ConfigError
from transferlab.schema import check_fields

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str] | tuple[str, ...] = (), hydra_cfg: bool = False) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, outside or inside a running Hydra app."""
    try:
        if GlobalHydra.instance().is_initialized():
            return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)
    except ConfigError:
        raise
    except Exception as err:  # Hydra's composition errors span many types and lines
        raise ConfigError(one_line(err)) from err


def one_line(err: BaseException) -> str:
    text = str(err).split("Config search path")[0]
    text = re.sub(r"\s*\n\s*", "; ", text.strip())
    return (
        text.replace(":;", ":")
        .replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "")
        .strip("; ")
    )


def parse_sweep(overrides: list[str], grid: Mapping[str, Any] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """The one reading of a multirun's grid: (fixed overrides, {swept key: its values}). `grid` is
    an experiment's `hydra.sweeper.params`; the command line overrides it key by key, as in Hydra."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    on_command_line = {o.get_key_element() for o in parsed}
    sweeps: dict[str, list[str]] = {}
    for key, value in (grid or {}).items():
        if key in on_command_line:
            continue
        override = parser.parse_override(f"{key}={value}")
        sweeps[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(value)]
    sweeps |= {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    return fixed, sweeps


def sweep_grid(overrides: list[str], grid: Mapping[str, Any] | None = None) -> tuple[int, list[str]]:
    """(number of jobs, keys that vary) of a multirun."""
    _, sweeps = parse_sweep(overrides, grid)
    return math.prod(len(v) for v in sweeps.values()), [k for k, v in sweeps.items() if len(v) > 1]


def sweep_choices(overrides: list[str], cfg: DictConfig | None = None) -> list[list[str]]:
    """Override lists that together touch every value of every sweep (command line and an
    experiment's `hydra.sweeper.params`), one sweep value at a time: a bad value in a 100-job
    grid fails before the first job, at the cost of one compose per value, not per job."""
    grid = OmegaConf.select(cfg, "hydra.sweeper.params") if cfg is not None else None
    fixed, sweeps = parse_sweep(overrides, grid)
    first = [f"{k}={v[0]}" for k, v in sweeps.items()]
    combos = [fixed + first]
    for key, values in sweeps.items():
        rest = [f for f in first if not f.startswith(f"{key}=")]
        combos += [fixed + rest + [f"{key}={value}"] for value in values[1:]]
    return combos


def check_config(cfg: DictConfig) -> None:
    """The checks that need no model library (required fields, schema.FIELDS' types and ranges):
    the CLI runs them on every sweep value before anything imports torch, so they answer at once."""
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(f"{missing[0]} is required (it is ???): set it on the command line, e.g. {missing[0]}=...")
    check_fields(cfg)  # types and ranges (schema.FIELDS); `validate` adds those spanning fields or registries


def validate(cfg: DictConfig) -> None:
    """Cheap checks of every group; each failure is one line naming the field and the fix. The
    registries it checks against live beside torch, so they are imported here, not at the top."""
    from transferlab.data import validate_data_config
    from transferlab.transfer import wise
    from transferlab.transfer.backbone import validate_backbone_config
    from transferlab.transfer.routes import route_for
    from transferlab.transfer.speed import validate_speed_config

    check_config(cfg)
    validate_backbone_config(cfg.backbone)
    validate_data_config(cfg.data)
    validate_speed_config(cfg.trainer)
    ft = cfg.finetune
    if ft.strategy == "scratch" and cfg.backbone.weights != "scratch":
        raise ConfigError(
            f"finetune=scratch with backbone.weights={cfg.backbone.weights}: "
            "drop that override (scratch means random init)"
        )
    if ft.head_solver == "lbfgs" and (ft.head.hidden or ft.cache_features == "off"):
        raise ConfigError(
            "finetune.head_solver=lbfgs fits one linear head on cached features: "
            "set finetune.head.hidden=[] and finetune.cache_features=unaugmented"
        )
    route_for(cfg).validate(cfg)
    wise.validate(ft)


def validate_stages(cfg: DictConfig, model: Any = None) -> None:
    """Stage references (`truncate_after`, `trainable_stages`, `freeze_depth`) against the real
    backbone (`model`, else built with random weights): catches `stage9` before a sweep starts."""
    from transferlab.transfer.backbone import build_model
    from transferlab.transfer.schedule import target_trainable
    from transferlab.transfer.stages import map_stages

    stages = map_stages(model if model is not None else build_model(cfg.backbone, pretrained=False))
    cut = cfg.finetune.truncate_after
    kept = len(stages.names) if cut is None else stages.cut_point(cut) + 1
    target_trainable(cfg.finetune, stages, kept)
