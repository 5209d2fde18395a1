"""Everything about a job's target, checked before an upstream model is trained or loaded.

A source model takes minutes to pretrain and a teacher to fine-tune; a missing data root, an
unknown class, a weights file of another architecture or a teacher with the wrong class count
must fail in seconds, before either. `check_target` runs in the CLI for every value of a sweep
(before the first job), in `transferlab advise`, and again at the start of each job (`run`).
"""

from __future__ import annotations

from pathlib import Path

import timm
from omegaconf import DictConfig

from transferlab.config import validate_stages
from transferlab.data import check_data
from transferlab.errors import ConfigError
from transferlab.jobs.upstream import is_remote, resolve_teacher
from transferlab.preflight import check_writable
from transferlab.transfer.backbone import build_model, input_spec, load_weights
from transferlab.transfer.distill import check_teacher_classes, load_teacher

_BUILT_IN = ("pretrained", "scratch", "source")


def check_target(cfg: DictConfig) -> dict[str, int]:
    """Stages, cache folder, weights file, data and teacher of `cfg`, with a randomly initialised
    backbone and the prepared-data store (decoded once, reused by the job) -> images per split."""
    model = build_model(cfg.backbone, pretrained=False)
    validate_stages(cfg, model)
    spec = input_spec(model, cfg.backbone, cfg.data)
    cache = Path(str(cfg.cache_dir))  # as the job reads it, so the store built here is the job's
    check_writable(cache, "cache_dir", "or set cache_dir to a writable folder")
    weights = str(cfg.backbone.weights)
    if weights not in _BUILT_IN and not is_remote(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"backbone.weights file {weights!r} does not exist: give a .safetensors or .pth path")
        load_weights(model, path)  # another architecture or a crafted pickle fails here
    names, sizes = check_data(cfg.data, spec, int(cfg.seed), cache)
    check_teacher(cfg, spec, len(names))
    return sizes


def check_teacher(cfg: DictConfig, spec, num_classes: int) -> None:
    """A distillation teacher that is not trained here (a file, a logged run, hub weights) must
    predict the target's classes; a `trained` teacher is trained on this data, so it does."""
    if str(cfg.finetune.strategy) != "distill" or str(cfg.finetune.teacher.weights) == "trained":
        return
    weights = resolve_teacher(cfg, train=_never)
    if weights.path is not None:
        load_teacher(weights, spec, num_classes)
        return
    pretrained = timm.models.get_pretrained_cfg(str(weights.backbone.name), allow_unregistered=True)
    if (out := getattr(pretrained, "num_classes", None)) is not None:
        check_teacher_classes(int(out), num_classes)


def _never(*args, **kwargs) -> dict[str, float]:
    raise AssertionError("check_teacher never trains a teacher")
