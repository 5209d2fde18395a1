"""Source models: train a backbone on a source task once, cache it, start transfers from it.

`backbone.weights=source` composes the experiment named by `backbone.source` with this run's
backbone, keys the cache (cache.py: locked, verified, atomic) on that config's hash, and trains
it (as its own MLflow run) only when the cache misses: parallel jobs and sweeps train it once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from transferlab.cache import ensure, entry_dir, verify
from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.identity import condition_hash, config_hash, flatten
from transferlab.tracking import RunTracker, experiment_id, tracking_uri

REMOTE_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")
WEIGHTS = "backbone.safetensors"


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


def source_entry(cfg: DictConfig, key: str) -> Path:
    """The cache folder of the source model whose source config hashes to `key`."""
    return entry_dir(cfg.cache_dir, "sources", f"{cfg.backbone.source}-{key}")


def ensure_source(cfg: DictConfig) -> tuple[Path, dict[str, str]]:
    """The cached source model (trained once, verified by size and sha256, rebuilt when damaged)
    and the tags that tie a job to it in the store the job logs to."""
    src = source_config(cfg)
    key = config_hash(src)
    folder = source_entry(cfg, key)
    if verify(folder) is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # ranks would deadlock
        raise ConfigError(
            f"source model {cfg.backbone.source!r} is not cached: run `transferlab pretrain` on one process first"
        )

    def build(tmp: Path) -> dict[str, str]:
        from transferlab.train import run

        print(f"training source model {cfg.backbone.source} ({key}) -> {folder}", flush=True)
        metrics = run(src, role="pretrain", backbone_out=tmp / WEIGHTS)
        trained = json.loads((tmp / "run.json").read_text())
        lineage = {"run_id": trained["run_id"], "tracking_uri": tracking_uri(src.tracking), "metrics": metrics}
        (tmp / "run.json").write_text(json.dumps(lineage, indent=1))
        return {"source": str(cfg.backbone.source), "config_hash": key}

    folder = ensure(cfg.cache_dir, "sources", folder.name, build, on_event=lambda m: print(m, flush=True))
    return folder / WEIGHTS, {
        "transferlab.source_run_id": source_run_in_store(src, key, folder),
        "transferlab.source_config_hash": key,
    }


def source_run_in_store(src: DictConfig, key: str, folder: Path) -> str:
    """The source's run in the store this job logs to. The cache is shared by every store, but
    its run.json names a run in the store that trained it: in any other store the cached model
    is registered once (weights, config and final metrics), so lineage and `reproduce` resolve."""
    lineage = json.loads((folder / "run.json").read_text())
    if rank_zero_only.rank != 0:  # only rank 0 tracks
        return lineage["run_id"]
    client, exp_id = experiment_id(src.tracking)
    try:
        if client.get_run(lineage["run_id"]).data.tags.get("transferlab.config_hash") == key:
            return lineage["run_id"]
    except MlflowException:  # not in this store
        pass
    query = f"tags.`transferlab.config_hash` = '{key}' and attributes.status = 'FINISHED'"
    with FileLock(str(folder) + ".register.lock"):
        if found := client.search_runs([exp_id], query, max_results=1):
            return found[0].info.run_id
        tracker = RunTracker(src.tracking)
        origin = f"{lineage['tracking_uri']} run {lineage['run_id']}"
        tags = {
            "transferlab.role": "pretrain",
            "transferlab.config_hash": key,
            "transferlab.condition_hash": condition_hash(src),
            "transferlab.registered_from": origin,
        }
        tracker.start(f"{folder.name}-registered", tags)
        tracker.log_params(flatten(src))
        tracker.log_text(OmegaConf.to_yaml(src, resolve=True), "config.yaml")
        tracker.log_metrics(lineage.get("metrics", {}))
        tracker.log_artifact(folder / WEIGHTS, "model")
        tracker.end()
        print(f"registered cached source model {folder.name} in {tracking_uri(src.tracking)} (from {origin})")
        return tracker.run_id
