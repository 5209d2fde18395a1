"""MLflow run lifecycle: one experiment per study, a parent run per sweep, a child run per job.

Everything goes through `MlflowClient` (not Lightning's MLFlowLogger: it truncates params,
trips on sqlite URIs, Lightning #19441, and logs from every rank). Only global rank 0 tracks.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from transferlab.compute import trainable_params

PARENT_ENV = "TRANSFERLAB_PARENT_RUN_ID"
PARENT_FILE = "parent_run_id"


def tracking_uri(cfg: DictConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_root(cfg: DictConfig, uri: str) -> str | None:
    if cfg.artifact_root:
        return Path(cfg.artifact_root).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(cfg: DictConfig) -> tuple[mlflow.MlflowClient, str]:
    """Get or create the study's experiment (and the store). Create it once, before parallel
    jobs start: concurrent first-time SQLite migrations fail."""
    uri = tracking_uri(cfg)
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return client, found.experiment_id
    try:
        return client, client.create_experiment(cfg.experiment, _artifact_root(cfg, uri))
    except MlflowException:  # another process created it first
        return client, client.get_experiment_by_name(cfg.experiment).experiment_id


def finished_run(cfg: DictConfig, config_hash: str) -> mlflow.entities.Run | None:
    """A FINISHED run of this exact config in the study, if any: re-launched sweeps skip it."""
    client, exp_id = experiment_id(cfg)
    query = f"tags.`transferlab.config_hash` = '{config_hash}' and attributes.status = 'FINISHED'"
    found = client.search_runs([exp_id], query, max_results=1)
    return found[0] if found else None


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


def config_hash(cfg: DictConfig, exclude: tuple[str, ...] = ("tracking",)) -> str:
    """Stable short hash of the resolved config (tracking excluded: where a run is logged does
    not change what it computes). Resume-by-hash and the source-model cache key on it."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in exclude:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def condition_hash(cfg: DictConfig) -> str:
    """Runs with equal condition hashes differ only by seed: the report pools them."""
    return config_hash(cfg, exclude=("tracking", "seed"))


def environment_tags() -> dict[str, str]:
    import timm
    import torch

    tags = {
        "transferlab.host": platform.node(),
        "transferlab.python": sys.version.split()[0],
        "transferlab.torch": torch.__version__,
        "transferlab.lightning": pl.__version__,
        "transferlab.timm": timm.__version__,
        "transferlab.mlflow": mlflow.__version__,
        "transferlab.device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
        tags["transferlab.git_dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.CalledProcessError):
        tags["transferlab.git_dirty"] = "unknown"
    return tags


class RunTracker:
    """One MLflow run. A no-op on ranks other than 0, so DDP never makes a run per process."""

    def __init__(self, cfg: DictConfig) -> None:
        self.enabled = rank_zero_only.rank == 0
        self.cfg = cfg
        self.run_id: str | None = None
        self.client: mlflow.MlflowClient | None = None

    def start(self, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> None:
        if not self.enabled:
            return
        self.client, exp_id = experiment_id(self.cfg)
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = self.client.create_run(exp_id, run_name=run_name, tags={**environment_tags(), **tags})
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        if self.run_id:
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.run_id and metrics:
            now = int(1000 * time.time())
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, path: str) -> None:
        if self.run_id:
            self.client.log_text(self.run_id, text, path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id and path.exists():
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            log(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status)


class EpochLogger(pl.Callback):
    """Per-epoch train/val metrics, every param group's LR and the trainable-parameter count,
    stepped by the global epoch so phases line up in the MLflow UI."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        epoch = module.epoch_offset + trainer.current_epoch
        validated = (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0
        prefixes = ("train/", "val/") if validated else ("train/",)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}
        for group in trainer.optimizers[0].param_groups:
            metrics[f"lr/{group['name']}"] = float(group["lr"])
        metrics["trainable_params"] = float(trainable_params(module))
        self.tracker.log_metrics(metrics, step=epoch)
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.endswith(("acc", "loss")))
        if validated:
            print(f"epoch {epoch}: {shown}", flush=True)


def parent_run_id() -> str | None:
    """The sweep's parent run: set by SweepCallback in this process, or found in the sweep dir
    (launchers that start a process per job)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    marker = Path(hydra_cfg.sweep.dir) / PARENT_FILE
    return marker.read_text().strip() if hydra_cfg.mode.name == "MULTIRUN" and marker.exists() else None


class SweepCallback(Callback):
    """Hydra callback: a parent MLflow run around a multirun, and the report at its end."""

    open_run: tuple[str, str] | None = None  # (uri, run id) of a sweep that has not ended yet

    @classmethod
    def fail_unfinished(cls) -> None:
        """Mark the parent run FAILED when a job aborted the multirun (Hydra skips the end hook)."""
        if cls.open_run is not None:
            uri, run_id = cls.open_run
            cls.open_run = None
            os.environ.pop(PARENT_ENV, None)
            mlflow.MlflowClient(uri).set_terminated(run_id, "FAILED")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracker = RunTracker(config.tracking)
        tracker.start(f"sweep-{config.study}", {"transferlab.role": "sweep"})
        if tracker.run_id is None:
            return
        tracker.log_params({"study": str(config.study)})
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(tracker.run_id)
        os.environ[PARENT_ENV] = tracker.run_id
        SweepCallback.open_run = (tracking_uri(config.tracking), tracker.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCallback.open_run = None
        run_id = os.environ.pop(PARENT_ENV, None)
        if run_id is None:
            return
        from transferlab.report import write_report

        try:
            path = write_report(
                config.tracking.experiment,
                Path("reports") / str(config.study),
                tracking_uri(config.tracking),
                run_id,
            )
            print(f"report: {path}")
        except Exception as err:  # a report problem must not hide the sweep's results
            warnings.warn(f"report failed: {err}", stacklevel=1)
        mlflow.MlflowClient(tracking_uri(config.tracking)).set_terminated(run_id, "FINISHED")
