"""Run identity: what a job is (its flat params and config hashes) and where it ran (environment tags).

Resume-by-hash, the source-model cache and the report's pooling of seeds all key on these hashes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferlab.tags import tag


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as `a.b.c -> value` strings, every field (MLflow params are flat)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, list | dict) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


# Bump whenever the same config would train differently (a bug fix in freezing, phases, data
# order, ...): it is folded into every config hash, so `tracking.resume` and the source-model
# cache never hand back results made by older code. History: 2 = frozen BatchNormAct2d stats;
# 3 = best-val weights per phase, optimizer reset + re-warm-up, no WD on norm/bias, per-phase shuffle.
TRAINING_SEMANTICS = 3


# Fields added after runs were stored, at the value that computes exactly what older configs did:
# left out of the hash, so stored runs, resume states and cached source models keep their keys.
HASH_NEUTRAL: dict[str, object] = {
    "finetune.head_solver": "sgd",
    "data.channels": 3,
    "data.extra_mean": None,
    "data.extra_std": None,
}


# Fields that say how far one invocation of a job goes, not what the job computes: a halving
# sweep runs the same job (same hash, checkpoint dir and MLflow run) rung after rung with a
# larger `trainer.stop_after_epochs`, so they are never part of its identity or its stored config.
RUN_CONTROLS = ("trainer.stop_after_epochs",)


def config_hash(cfg: DictConfig, exclude: tuple[str, ...] = ("tracking",)) -> str:
    """Stable short hash of the resolved config and the training-semantics version (tracking
    excluded: where a run is logged does not change what it computes; so are RUN_CONTROLS).
    Resume-by-hash and the source-model cache key on it."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in exclude:
        data.pop(key, None)
    for path in RUN_CONTROLS:
        group, _, name = path.rpartition(".")
        if isinstance(data.get(group), dict):
            data[group].pop(name, None)
    for path, neutral in HASH_NEUTRAL.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            del node[leaf]
    data["__training_semantics__"] = TRAINING_SEMANTICS
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def stored_config(cfg: DictConfig) -> DictConfig:
    """The config as a run logs it (params, config.yaml): RUN_CONTROLS at their defaults (None),
    so reproducing a run that a halving sweep promoted trains it to the end."""
    out = cfg.copy()
    for path in RUN_CONTROLS:
        if OmegaConf.select(out, path, default=None) is not None:
            OmegaConf.update(out, path, None)
    return out


def condition_hash(cfg: DictConfig) -> str:
    """Runs with equal condition hashes differ only by seed: the report pools them."""
    return config_hash(cfg, exclude=("tracking", "seed"))


def environment_tags() -> dict[str, str]:
    """Versions, host, device and git state: a run says where and with what it ran."""
    import mlflow
    import pytorch_lightning as pl
    import timm
    import torch

    tags = {
        tag("host"): platform.node(),
        tag("python"): sys.version.split()[0],
        tag("torch"): torch.__version__,
        tag("lightning"): pl.__version__,
        tag("timm"): timm.__version__,
        tag("mlflow"): mlflow.__version__,
        tag("device"): torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        tag("training_semantics"): str(TRAINING_SEMANTICS),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
        tags[tag("git_dirty")] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.CalledProcessError):
        tags[tag("git_dirty")] = "unknown"
    return tags


NAMED = {"data", "data.name", "data.root", "data.samples_per_class", "data.fraction", "finetune", "seed", "study"}


def job_run_name(cfg: DictConfig, varied: tuple[str, ...] | list[str] = ()) -> str:
    """Short and complete: target, train size, strategy, every other swept value, seed
    (`digits-10/class-fine_tune-freeze_depth=2-s0`), so runs of one sweep never share a name."""
    data = cfg.data
    target = Path(str(data.root)).name if data.name == "imagefolder" and data.get("root") else data.name
    if data.samples_per_class:
        size = f"{data.samples_per_class}/class"
    else:
        size = "all" if float(data.fraction) >= 1 else f"{float(data.fraction):.0%}"
    extras = [f"{k.rpartition('.')[2]}={OmegaConf.select(cfg, k)}" for k in varied if k not in NAMED]
    return "-".join([str(target), size, str(cfg.finetune.strategy), *extras, f"s{cfg.seed}"])


def hydra_run() -> DictConfig | None:
    """The running Hydra job's `hydra` config, or None outside a Hydra run. One place for the
    check: a config left behind by an in-process CLI call (no output dir) is not a run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or OmegaConf.is_missing(HydraConfig.get().runtime, "output_dir"):
        return None
    return HydraConfig.get()
