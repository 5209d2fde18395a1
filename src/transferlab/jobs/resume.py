"""Per-job checkpoints, so a killed job continues where it stopped, in the same MLflow run.

Each job owns `<cache_dir>/jobs/<config hash>/` (never the working directory: Lightning on SLURM
resumes any `hpc_ckpt_*` it finds in `default_root_dir`, and a requeued Hydra job gets a new
output dir, lightning-hydra-template #146). It holds the job's MLflow run id, the state after
each finished phase (weights and counters) and the last end-of-epoch checkpoint of the running
phase, including the RNG and data-order state that make the resumed run end with the same
metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from transferlab import tags
from transferlab.tracking.identity import config_hash
from transferlab.tracking.run import experiment_id, finished_run
from transferlab.transfer.compute import FitTimer

RUN_FILE = "run.json"
STATE_FILE = "phases.json"
WEIGHTS_FILE = "phases.pt"


class JobCheckpoint:
    """The resume state of one job, keyed by its config hash."""

    def __init__(self, cache_dir: str | Path, config_hash: str, enabled: bool) -> None:
        self.dir = Path(cache_dir).resolve() / "jobs" / config_hash
        self.enabled = enabled

    # --- the MLflow run ------------------------------------------------------------------
    def run_id(self) -> str | None:
        path = self.dir / RUN_FILE
        return json.loads(path.read_text())["run_id"] if self.enabled and path.exists() else None

    def bind(self, run_id: str | None) -> None:
        """Remember the job's run (rank 0 only: other ranks have none)."""
        if self.enabled and run_id:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.dir / RUN_FILE, json.dumps({"run_id": run_id}).encode())

    def discard(self) -> None:
        """Drop a stale state (its run is gone or belongs elsewhere) or a finished job's files."""
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- phase boundaries ----------------------------------------------------------------
    def phases_done(self) -> dict[str, Any] | None:
        """Counters after the last finished phase (`phases` = how many), or None."""
        path = self.dir / STATE_FILE
        return json.loads(path.read_text()) if self.enabled and path.exists() else None

    def save_phase(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        """After a phase: its final weights and the loop's counters; the epoch checkpoint goes."""
        if not self.enabled or not _is_rank_zero():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{WEIGHTS_FILE}.tmp"
        torch.save(module.state_dict(), tmp)
        tmp.replace(self.dir / WEIGHTS_FILE)
        _atomic_write(self.dir / STATE_FILE, json.dumps(state).encode())
        self.epoch_checkpoint(state["phases"] - 1).unlink(missing_ok=True)

    def load_phase_weights(self, module: torch.nn.Module) -> None:
        module.load_state_dict(torch.load(self.dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))

    # --- within a phase ------------------------------------------------------------------
    def epoch_checkpoint(self, phase: int) -> Path:
        return self.dir / f"phase{phase}-last.ckpt"

    def resume_path(self, phase: int) -> str | None:
        """Lightning `ckpt_path` for this phase, when a killed run left one."""
        path = self.epoch_checkpoint(phase)
        return str(path) if self.enabled and path.exists() else None


class EpochCheckpoint(pl.Callback):
    """Saves the trainer's state at an epoch end (atomically) with the RNG and data-order state and
    the fit timer, and restores them when a fit resumes from it. Place it last, so the epoch's
    metrics are logged and early stopping has counted before the save.

    It saves at most every `every_s` seconds (0: every epoch), and always at the epoch where a
    SIGTERM arrived and, with `final`, at the fit's last epoch (a halving rung's stop). Any epoch
    end resumes exactly, so a rarer save loses at most `every_s` seconds of a killed job's work,
    never its metrics. `before_save` runs first (the tracker's flush: no epoch before the saved
    one waits in a buffer that a kill would lose)."""

    def __init__(
        self,
        path: Path,
        timer: FitTimer,
        every_s: float = 0.0,
        final: bool = False,
        before_save: Callable[[], object] | None = None,
    ) -> None:
        self.path = path
        self.timer = timer
        self.every_s, self.final, self.before_save = every_s, final, before_save
        self.saves = 0
        self._restored: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._fit_started = self._saved_at = time.perf_counter()

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._fit_started = self._saved_at = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.strategy.broadcast(self._due(trainer), src=0):  # every rank saves, or none
            return
        if self.before_save is not None:
            self.before_save()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            tmp.replace(self.path)
        self.saves += 1
        self._saved_at = time.perf_counter()

    def _due(self, trainer: pl.Trainer) -> bool:
        last = self.final and trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        return last or trainer.received_sigterm or time.perf_counter() - self._saved_at >= self.every_s

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        generator = _sampler_generator(self._trainer.train_dataloader if self._trainer else None)
        seconds = self.timer.seconds + time.perf_counter() - self._fit_started
        return {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "sampler": generator.get_state() if generator is not None else None,
            "timer": {"seconds": seconds, "samples": self.timer.samples, "eval_samples": self.timer.eval_samples},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The global RNGs now: Lightning restores callbacks before `configure_optimizers`, whose
        `estimated_stepping_batches` builds the first train iterator, and building one draws its
        base seed from the global torch RNG, as every later epoch's does in an unbroken run; the
        sampler and the timer once the loaders exist (on_train_start)."""
        self._restored = state_dict
        self._restore_rng(state_dict)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        generator = _sampler_generator(trainer.train_dataloader)
        if generator is not None and state["sampler"] is not None:
            generator.set_state(state["sampler"])
        self.timer.seconds = float(state["timer"]["seconds"])
        self.timer.samples = int(state["timer"]["samples"])
        self.timer.eval_samples = int(state["timer"]["eval_samples"])

    @staticmethod
    def _restore_rng(state: dict[str, Any]) -> None:
        """The global RNGs as they were at the saved epoch end (augmentation draws from them)."""
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))


def job_checkpoint(cfg: DictConfig, config_hash: str, role: str) -> JobCheckpoint:
    """Checkpoints and resume go with `tracking.resume` (the default) for sweep jobs; source
    models and reproductions always run afresh."""
    return JobCheckpoint(cfg.cache_dir, config_hash, enabled=bool(cfg.tracking.resume) and role == "job")


def finished_job(cfg: DictConfig) -> mlflow.entities.Run | None:
    """The one skip-if-finished rule: with `tracking.resume` on, a job whose exact config already
    finished in this store is not run again (its run is returned)."""
    return finished_run(cfg.tracking, config_hash(cfg)) if cfg.tracking.resume else None


def resumable_run(job: JobCheckpoint, tracking: DictConfig, config_hash: str) -> str | None:
    """The run a killed job left unfinished in this store, if its state is there to continue."""
    run_id = job.run_id()
    if run_id is None or not _is_rank_zero():
        return None
    client, exp_id = experiment_id(tracking)
    try:
        run = client.get_run(run_id)
    except MlflowException:  # another store, or the run was deleted
        return None
    same = run.info.experiment_id == exp_id and run.data.tags.get(tags.CONFIG_HASH) == config_hash
    return run_id if same and run.info.status != "FINISHED" and run.info.lifecycle_stage == "active" else None


def _sampler_generator(loader: Any) -> torch.Generator | None:
    """The RandomSampler's generator inside the datamodule's whole-batch sampler, if any."""
    inner = getattr(getattr(loader, "sampler", None), "sampler", None)
    return getattr(inner, "generator", None)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
