"""MLflow run lifecycle: the store, the study's experiment, one run's params/metrics/artifacts.

Everything goes through `MlflowClient` (not Lightning's MLFlowLogger: it truncates params,
trips on sqlite URIs, Lightning #19441, and logs from every rank). Only global rank 0 tracks.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import pytorch_lightning as pl
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from transferlab.preflight import check_store, check_writable
from transferlab.tracking.buffer import BufferedClient
from transferlab.tracking.identity import environment_tags
from transferlab.tracking.links import set_default_view
from transferlab.transfer.compute import trainable_params


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
    if found is None:
        try:
            exp_id = client.create_experiment(cfg.experiment, _artifact_root(cfg, uri))
            set_default_view(client, exp_id)
            found = client.get_experiment(exp_id)
        except MlflowException:  # another process created it first
            found = client.get_experiment_by_name(cfg.experiment)
    sqlite_wal(uri)
    return client, found.experiment_id


def sqlite_wal(uri: str) -> None:
    """Put a local SQLite store in WAL mode (persistent, once per file): readers no longer block
    writers, so parallel jobs wait less (benchmarks/bench_parallel_store.py). MLflow itself
    sets only a busy timeout. Not for stores on network file systems: use `mlflow server` there."""
    if not uri.startswith("sqlite:///") or uri in _WAL_DONE:
        return
    path = Path(uri.removeprefix("sqlite:///"))
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(path, timeout=20)) as db:
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")
    _WAL_DONE.add(uri)


_WAL_DONE: set[str] = set()


def finished_run(cfg: DictConfig, config_hash: str) -> mlflow.entities.Run | None:
    """A FINISHED run of this exact config in the study, if any: re-launched sweeps skip it."""
    client, exp_id = experiment_id(cfg)
    query = f"tags.`transferlab.config_hash` = '{config_hash}' and attributes.status = 'FINISHED'"
    found = client.search_runs([exp_id], query, max_results=1)
    return found[0] if found else None


class RunTracker:
    """One MLflow run. A no-op on ranks other than 0, so DDP never makes a run per process."""

    def __init__(self, cfg: DictConfig) -> None:
        self.enabled = rank_zero_only.rank == 0
        self.cfg = cfg
        self.run_id: str | None = None
        self.client: mlflow.MlflowClient | None = None
        self.writer: BufferedClient | None = None
        # How long epoch metrics may wait to be written together; also how often a job saves its
        # resume state within a phase (jobs.resume.EpochCheckpoint): it flushes them first.
        self.save_every_s = float(cfg.get("save_every_s", 0))

    def start(self, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> None:
        if not self.enabled:
            return
        check_store(tracking_uri(self.cfg))
        self.client, exp_id = experiment_id(self.cfg)
        location = urlparse(self.client.get_experiment(exp_id).artifact_location)
        if location.scheme in ("", "file"):  # a local folder: full or read-only fails here, not mid-run
            check_writable(Path(url2pathname(location.path)), "artifact location")
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = self.client.create_run(exp_id, run_name=run_name, tags={**environment_tags(), **tags})
        self._open(run.info.run_id)

    def _open(self, run_id: str) -> None:
        self.run_id = run_id
        spool = Path(self.cfg.get("fallback_dir") or "outputs/unsaved_runs") / run_id
        retry = float(self.cfg.get("retry_seconds", 120))
        self.writer = BufferedClient(self.client, run_id, spool, retry, defer_s=self.save_every_s)

    def attach(self, run_id: str) -> None:
        """Continue an existing run (a resumed job, a sweep's parent): it reads RUNNING again."""
        if not self.enabled:
            return
        self.client, _ = experiment_id(self.cfg)
        self.client.update_run(run_id, status="RUNNING")
        self._open(run_id)

    def log_params(self, params: dict[str, str]) -> None:
        if self.run_id:
            self.writer.log_batch(params=[Param(k, v[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, defer: bool = False) -> None:
        """`defer`: written with the next write that is not, at `flush()`, or within `save_every_s`;
        a job defers what it logs while it trains, and a resumed job logs it again."""
        if self.run_id and metrics:
            now = int(1000 * time.time())
            self.writer.log_batch(metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()], defer=defer)

    def flush(self) -> None:
        """Write what is deferred now (before a resume state is saved, so a kill cannot lose it)."""
        if self.run_id:
            self.writer.flush()

    def set_tags(self, tags: dict[str, str], defer: bool = False) -> None:
        if self.run_id and tags:
            self.writer.log_batch(tags=[RunTag(k, str(v)) for k, v in tags.items()], defer=defer)

    def log_text(self, text: str, path: str) -> None:
        if self.run_id:
            self.writer.log_text(text, path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id and path.exists():
            self.writer.log_artifact(path, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED only after every buffered write landed (else StoreLostError, saved locally);
        a failed run is marked FAILED if the store answers, and saved locally if not."""
        if not self.run_id:
            return
        self.writer.pending.append(("set_terminated", (self.run_id, status), {}))
        if status == "FINISHED":
            self.writer.drain()
            return
        landed = False
        for _ in range(len(self.writer.pending)):  # each refused write is dropped, then the rest go on
            try:
                landed = self.writer.flush(force=True)
                break
            except Exception:  # the error that failed the job may fail a queued write too
                continue
        if not landed:
            path = self.writer.save_locally()
            print(f"tracking store unreachable: run {self.run_id} not marked {status}; its logs are in {path}")


class EpochLogger(pl.Callback):
    """Per-epoch train/val metrics, every param group's LR and the trainable-parameter count,
    stepped by the global epoch so phases line up in the MLflow UI."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Every rank reads callback_metrics: reading them syncs `sync_dist` metrics (a collective),
        # so a rank-0-only read deadlocks DDP against the other ranks' own epoch-end reduce.
        current = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
        epoch = module.epoch_offset + trainer.current_epoch
        validated = (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0
        prefixes = ("train/", "val/") if validated else ("train/",)
        metrics = {k: float(v) for k, v in current.items() if k.startswith(prefixes)}
        for group in trainer.optimizers[0].param_groups:
            metrics[f"lr/{group['name']}"] = float(group["lr"])
        metrics["trainable_params"] = float(trainable_params(module))
        self.tracker.log_metrics(metrics, step=epoch, defer=True)
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.endswith(("acc", "loss")))
        if validated:
            print(f"epoch {epoch}: {shown}", flush=True)
