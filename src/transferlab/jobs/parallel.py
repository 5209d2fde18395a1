"""How parallel jobs share one machine: CPU threads per job, and a GPU slot per job.

With Hydra's joblib launcher every job sees every GPU and every core (hydra #1331): left alone,
all jobs land on GPU 0 and each starts one thread per core. A job here takes the first free
slot of `trainer.devices` GPUs (a file lock in the sweep directory, released when the job
ends, so a worker process that runs several jobs in turn frees its slot each time), and on CPU
uses cores / parallel jobs threads. Jobs from Ray (`num_gpus`) or SLURM arrive pinned already.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from transferlab.tracking.identity import hydra_run

_assigned = threading.local()  # this job's GPU indices, read by the Trainer


def parallel_jobs() -> int:
    """How many jobs the running Hydra launcher runs at once (1 when it runs them in turn)."""
    if (hc := hydra_run()) is None:
        return 1
    launcher = hc.launcher
    n_jobs = launcher.get("n_jobs") if "n_jobs" in launcher else None
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    return os.cpu_count() or 1 if n_jobs < 0 else max(1, n_jobs)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Cores shared evenly between parallel jobs (at least one thread each)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def gpu_slots(gpus: int, per_job: int) -> list[list[int]]:
    """Disjoint groups of `per_job` GPU indices: [[0], [1], ...] or [[0, 1], [2, 3], ...]."""
    return [list(range(start, start + per_job)) for start in range(0, gpus - per_job + 1, per_job)]


@contextlib.contextmanager
def job_resources(cfg: DictConfig, sweep_dir: Path | None) -> Iterator[list[int] | None]:
    """For the job's duration: its CPU threads and, on a multi-GPU box, its own GPUs."""
    jobs = parallel_jobs()
    if jobs > 1 and not torch.cuda.is_available():
        torch.set_num_threads(threads_per_job(jobs))
    per_job = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 0
    gpus = torch.cuda.device_count() if cfg.trainer.accelerator in ("gpu", "cuda", "auto") else 0
    if jobs <= 1 or sweep_dir is None or per_job < 1 or gpus < 2 * per_job:
        yield None
        return
    with _take_slot(Path(sweep_dir) / "gpu_slots", gpu_slots(gpus, per_job)) as devices:
        _assigned.devices = devices
        try:
            yield devices
        finally:
            _assigned.devices = None


def join_submitit_tasks() -> None:
    """A submitit job with several tasks (`hydra.launcher.tasks_per_node` > 1) is one DDP job:
    export torch's env:// variables from submitit's job environment, so Lightning takes the
    tasks as its ranks instead of starting its own (on SLURM its SLURM environment does this).
    Outside such a job it does nothing. Call before anything logs or builds."""
    if "SLURM_JOB_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return
    try:
        import submitit

        tasks = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not installed, or not inside a submitit job
        return
    if tasks.num_tasks < 2:
        return
    # Every GPU stays visible: Lightning picks the rank's device from LOCAL_RANK.
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    rank_zero_only.rank = dist.rank  # read at import, before these variables existed
    if not torch.cuda.is_available():  # the job's ranks share the cores
        torch.set_num_threads(threads_per_job(dist.local_world_size))


def assigned_devices(configured: int | str | list) -> int | str | list:
    """The Trainer's `devices`: the job's GPU slot when it has one, else the configured value."""
    return getattr(_assigned, "devices", None) or configured


@contextlib.contextmanager
def _take_slot(folder: Path, slots: list[list[int]], poll_s: float = 1.0) -> Iterator[list[int]]:
    """The first free slot, waiting while all are busy (more workers than slots)."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for devices in slots:
            lock = FileLock(folder / f"{'-'.join(map(str, devices))}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield devices
            finally:
                lock.release()
            return
        threading.Event().wait(poll_s)
