"""Typed fields: every bad type or range fails in `validate` (before any job or data decode),
for every swept value, with one line naming the field and a fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST
from transferlab.config import compose_config, validate
from transferlab.errors import ConfigError
from transferlab.schema import FIELDS

OUT_OF_RANGE = {
    "seed": "-1",
    "optim.lr": "0",
    "optim.weight_decay": "-0.1",
    "optim.momentum": "1.0",
    "optim.warmup_epochs": "-1",
    "optim.rewarm_epochs": "-1",
    "finetune.head_lr_mult": "0",
    "finetune.backbone_lr_mult": "-1",
    "finetune.layer_decay": "2",
    "finetune.head_epochs": "-1",
    "finetune.head_patience": "0",
    "finetune.gradual_every": "0",
    "finetune.head.dropout": "1.0",
    "trainer.max_epochs": "0",
    "finetune.freeze_depth": "-1",
    "finetune.temperature": "0",
    "finetune.alpha": "1.5",
    "trainer.min_steps": "-5",
    "trainer.stop_after_epochs": "0",
    "tracking.save_every_s": "-1",
    "trainer.num_nodes": "0",
    "data.batch_size": "0",
    "data.num_workers": "-1",
    "data.split_seed": "-1",
    "data.channels": "0",
    "data.extra_mean": "[]",
    "data.extra_std": "[0.2,-1]",
}


@pytest.fixture(scope="module")
def base():
    return compose_config(FAST)


def _with(path: str) -> list[str]:
    """FAST, plus the override that brings a route's own field in (schema.Field.needs)."""
    return [*FAST, FIELDS[path].needs] if FIELDS[path].needs else FAST


def test_every_field_exists_in_the_composed_config(base):
    for path in FIELDS:
        cfg = compose_config(_with(path)) if FIELDS[path].needs else base
        assert OmegaConf.select(cfg, path, default="absent") != "absent", path
    validate(base)  # the defaults pass


@pytest.mark.parametrize("path", FIELDS)
def test_wrong_type_names_the_field_and_a_fix(base, path):
    cfg = compose_config(_with(path)) if FIELDS[path].needs else base.copy()
    OmegaConf.update(cfg, path, "abc" if FIELDS[path].kind is not str else "nope")
    with pytest.raises(
        ConfigError, match=rf"^{path.replace('.', '[.]')}='(abc|nope)' is invalid: use .*, e\.g\. "
    ) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    example = compose_config([*_with(path), f"{path}={FIELDS[path].example}"])
    validate(example)  # the suggested fix is itself valid


@pytest.mark.parametrize("path", [p for p in FIELDS if FIELDS[p].kind is not str])
def test_out_of_range_names_the_field(path):
    with pytest.raises(ConfigError, match=rf"^{path.replace('.', '[.]')}=.* is invalid"):
        validate(compose_config([*_with(path), f"{path}={OUT_OF_RANGE[path]}"]))


def test_every_numeric_field_has_an_out_of_range_case():
    assert {p for p in FIELDS if FIELDS[p].kind is not str} == set(OUT_OF_RANGE)


@pytest.mark.slow
def test_a_bad_swept_value_fails_before_the_first_job(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for sweep in ("optim.lr=0.01,abc", "finetune.layer_decay=0.5,1.5", "finetune.backbone_lr_mult=0.1,-1"):
        result = subprocess.run(
            [sys.executable, "-m", "transferlab", "train", "-m", *FAST, sweep],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"transferlab train: error: {sweep.split('=')[0]}="), line
    assert not (tmp_path / "mlflow.db").exists()  # no job started
