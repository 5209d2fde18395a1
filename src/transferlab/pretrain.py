"""Source models: train a backbone on a source task once, cache it, start transfers from it.

`backbone.weights=source` composes the experiment named by `backbone.source` with this run's
backbone, keys the cache on that config's hash, and trains it (as its own MLflow run) only
when the cache misses. A file lock keeps parallel jobs from training it twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlflow
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.identity import config_hash
from transferlab.tracking import tracking_uri

REMOTE_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")


def resolve_checkpoint(cfg: DictConfig) -> tuple[Path | None, dict[str, str]]:
    """Local weights file for `backbone.weights` (None: timm handles pretrained/scratch)."""
    weights = str(cfg.backbone.weights)
    if weights == "source":
        return ensure_source(cfg)
    if weights.startswith(REMOTE_PREFIXES):
        tags = {"transferlab.source_run_id": weights.split("/")[1]} if weights.startswith("runs:/") else {}
        return fetch_artifact(weights, cfg, "backbone.weights"), tags
    return None, {}


def fetch_artifact(uri: str, cfg: DictConfig, field: str) -> Path:
    """Download an MLflow artifact (`runs:/<run_id>/<path>`, ...) into the cache; `field` names
    the config field that asked for it, for the error."""
    try:
        folder = Path(cfg.cache_dir).expanduser() / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(uri, dst_path=str(folder), tracking_uri=tracking_uri(cfg.tracking))
        return Path(local)
    except Exception as err:  # MlflowException, OSError: all mean "not there"
        raise ConfigError(f"{field}={uri!r} could not be fetched ({err}): check the run id and path") from err


def source_config(cfg: DictConfig) -> DictConfig:
    """The source task for this run's backbone, logged to the same store, from random init."""
    src = compose_config([f"experiment={cfg.backbone.source}", *cfg.backbone.get("source_overrides", [])])
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True) | {"weights": "scratch"}
    OmegaConf.update(src, "backbone", backbone, merge=False)
    OmegaConf.update(
        src,
        "tracking",
        # resume off: the cached file is what counts, not a finished run somewhere in the store
        {**OmegaConf.to_container(cfg.tracking, resolve=True), "experiment": src.study, "resume": False},
        merge=False,
    )
    OmegaConf.update(src, "cache_dir", cfg.cache_dir)
    return src


def ensure_source(cfg: DictConfig) -> tuple[Path, dict[str, str]]:
    src = source_config(cfg)
    key = config_hash(src)
    folder = Path(cfg.cache_dir).expanduser() / "sources" / f"{cfg.backbone.source}-{key}"
    weights = folder / "backbone.safetensors"
    if not weights.exists():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # ranks would deadlock on the lock
            raise ConfigError(
                f"source model {cfg.backbone.source!r} is not cached: run `transferlab pretrain` on one process first"
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not weights.exists():
                from transferlab.train import run

                print(f"training source model {cfg.backbone.source} ({key}) -> {weights}", flush=True)
                run(src, role="pretrain", backbone_out=weights)
    meta = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    return weights, {
        "transferlab.source_run_id": meta.get("run_id", ""),
        "transferlab.source_config_hash": key,
    }
