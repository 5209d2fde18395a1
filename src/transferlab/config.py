"""Compose and validate configs. Validation runs once, before any weights or data are loaded."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import ConfigError
from transferlab.schema import FIELDS, check_fields

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The parts of a config that `validate`, the target check and the service probes read together
# with other fields: a swept value in one of them is checked in a whole config. Nothing reads a
# value elsewhere (seed, optim.*) before a job but its schema rule, so that rule alone checks it.
CHECKED_WHOLE = ("data", "backbone", "finetune", "trainer", "tracking", "cache_dir")


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
    fixed, sweeps = _parse_grid(overrides, grid)
    return fixed, {key: [text for text, _ in values] for key, (_, values) in sweeps.items()}


def _parse_grid(
    overrides: list[str], grid: Mapping[str, Any] | None
) -> tuple[list[str], dict[str, tuple[Override, list[tuple[str, Any]]]]]:
    """parse_sweep's reading, each swept key with its parsed override and (text, typed value) pairs."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    on_command_line = {o.get_key_element() for o in parsed}
    sweeps: dict[str, tuple[Override, list[tuple[str, Any]]]] = {}
    from_grid = [parser.parse_override(f"{k}={v}") for k, v in (grid or {}).items() if k not in on_command_line]
    for o in [*from_grid, *(o for o in parsed if o.is_sweep_override())]:
        if o.is_sweep_override():  # typed as Hydra composes them (Override._convert_value unquotes)
            values = list(zip(o.sweep_string_iterator(), o.sweep_iterator(transformer=Override._convert_value)))
        else:
            values = [(o.get_value_element_as_str(), o.value())]
        sweeps[o.get_key_element()] = (o, values)
    return fixed, sweeps


def sweep_grid(overrides: list[str], grid: Mapping[str, Any] | None = None) -> tuple[int, list[str]]:
    """(number of jobs, keys that vary) of a multirun."""
    _, sweeps = parse_sweep(overrides, grid)
    return math.prod(len(v) for v in sweeps.values()), [k for k, v in sweeps.items() if len(v) > 1]


def config_groups() -> set[str]:
    """The config groups (`data=digits`, `finetune=probe`): the folders of conf/."""
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


@dataclass
class SweepChecks:
    """A multirun's values, each checked once before the first job (`sweep_checks`)."""

    compose: list[list[str]]  # composed and checked whole: the first grid point, then each other group choice
    derive: list[tuple[str, Any]] = field(default_factory=list)  # CHECKED_WHOLE fields: set into the first point
    schema: list[tuple[str, Any]] = field(default_factory=list)  # other fields: their schema rule alone


def sweep_checks(overrides: list[str], cfg: DictConfig | None = None) -> SweepChecks:
    """Every value of every sweep (command line and an experiment's `hydra.sweeper.params`), one
    at a time from the first grid point: a bad value in a 1,000-job grid fails before the first
    job. Only group choices (and +/~ keys) are composed; another value of a CHECKED_WHOLE field is
    set into the first point's composed config; any other value (1,000 seeds) is checked by its
    schema rule, with no config at all."""
    grid = OmegaConf.select(cfg, "hydra.sweeper.params") if cfg is not None else None
    fixed, sweeps = _parse_grid(overrides, grid)
    first = [f"{key}={values[0][0]}" for key, (_, values) in sweeps.items()]
    checks = SweepChecks([fixed + first])
    groups = config_groups()
    for key, (override, values) in sweeps.items():
        name = override.key_or_group
        if name.split("@")[0] in groups or "/" in name or name.startswith("hydra") or key[0] in "+~":
            rest = [f for f in first if not f.startswith(f"{key}=")]
            checks.compose += [fixed + rest + [f"{key}={text}"] for text, _ in values[1:]]
            continue
        typed = [(name, value) for value in list(dict(values).values())[1:]]
        (checks.derive if name.split(".")[0] in CHECKED_WHOLE else checks.schema).extend(typed)
    return checks


def with_value(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    """A copy of `cfg` with one field set, as the override `key=value` composes it."""
    out = copy.deepcopy(cfg)
    OmegaConf.update(out, key, value, merge=False)
    return out


def check_value(key: str, value: Any) -> None:
    """One swept value against its schema rule (schema.FIELDS); a field without one has none."""
    if key in FIELDS:
        node = OmegaConf.create({})
        OmegaConf.update(node, key, value)
        check_fields(node, {key: FIELDS[key]})


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
