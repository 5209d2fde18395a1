"""Override keys checked against the composed config: a typo gets "did you mean", never a silent no-op.

Hydra answers `finetune.freeze_dept=2` with "use +finetune.freeze_dept=2", and following that hint
adds a field nothing reads. Here every `key=value` must name a real field, and a `+key=value` is
accepted only under a free-form mapping that is passed on as keyword arguments (`backbone.kwargs`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import ConfigError

FREE_FORM = ("backbone.kwargs",)  # mappings whose keys are forwarded, not read by name


def config_keys(cfg: DictConfig) -> set[str]:
    """Every dotted path in the config, inner nodes included (`finetune`, `finetune.head.hidden`)."""
    keys: set[str] = set()

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                keys.add(f"{prefix}{key}")
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return keys


def closest_key(key: str, known: set[str]) -> str | None:
    """The real field a typo most likely meant: same parent first, then anywhere."""
    parent = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    for pool in (siblings, list(known)):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    leaf = key.rpartition(".")[2]
    by_leaf = [k for k in known if difflib.get_close_matches(leaf, [k.rpartition(".")[2]], cutoff=0.8)]
    return min(by_leaf, key=len) if by_leaf else None


def check_override_keys(overrides: list[str], compose: Callable[[list[str]], DictConfig], groups: set[str]) -> None:
    """Raise a one-line ConfigError for an override naming no config field.

    `compose` builds the config from the group choices alone (`data=digits`, `experiment=...`),
    so the fields a value override may touch are those that config really has.
    """
    parsed = OverridesParser.create().parse_overrides(overrides)
    is_group = [o.key_or_group.split("@")[0] in groups for o in parsed]
    values = [o for o, group in zip(parsed, is_group) if not group and not o.key_or_group.startswith("hydra")]
    if not values:
        return
    known = config_keys(compose([o.input_line for o, group in zip(parsed, is_group) if group]))
    for o in values:
        key = o.key_or_group
        if key in known or (o.is_add() or o.is_force_add()) and key.startswith(tuple(f"{f}." for f in FREE_FORM)):
            continue
        hint = closest_key(key, known)
        value = o.input_line.split("=", 1)[1]
        fix = f"did you mean {hint}? ({hint}={value})" if hint else "see `transferlab train --cfg job`"
        added = " (adding it with + would train with it silently ignored)" if o.is_add() or o.is_force_add() else ""
        raise ConfigError(f"{key} is not a config field{added}: {fix}")
