"""Parallel jobs on one machine: GPU slots, CPU threads, and many writers into one store."""

from __future__ import annotations

import subprocess
import sys
import threading

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from transferlab.jobs import parallel
from transferlab.jobs.parallel import assigned_devices, gpu_slots, job_resources, threads_per_job


def test_gpu_slots_are_disjoint_groups() -> None:
    assert gpu_slots(4, 1) == [[0], [1], [2], [3]]
    assert gpu_slots(4, 2) == [[0, 1], [2, 3]]
    assert gpu_slots(5, 2) == [[0, 1], [2, 3]]  # a leftover GPU is never half a slot
    assert gpu_slots(1, 2) == []


def test_threads_share_the_cores() -> None:
    assert threads_per_job(2, cores=16) == 8
    assert threads_per_job(3, cores=16) == 5
    assert threads_per_job(8, cores=2) == 1


def test_parallel_jobs_each_get_their_own_gpu(tmp_path, monkeypatch) -> None:
    """Four jobs at once on a (pretended) 4-GPU box: four different GPUs, none shared; a fifth waits."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(parallel, "parallel_jobs", lambda: 4)
    cfg = OmegaConf.create({"trainer": {"devices": 1, "accelerator": "auto"}})
    seen, release, holding = [], threading.Event(), threading.Barrier(5)

    def job() -> None:
        with job_resources(cfg, tmp_path):
            seen.append(assigned_devices(1))
            holding.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    holding.wait(timeout=30)  # all four hold a slot at the same time
    assert sorted(seen) == [[0], [1], [2], [3]]
    fifth: list = []
    waiting = threading.Thread(target=lambda: fifth.append(_one_job(cfg, tmp_path)))
    waiting.start()
    waiting.join(timeout=1.5)
    assert waiting.is_alive()  # no free GPU: it waits instead of doubling up
    release.set()
    for t in [*threads, waiting]:
        t.join(timeout=30)
    assert fifth[0] in ([0], [1], [2], [3])
    assert assigned_devices(1) == 1  # outside a job: the configured value


def _one_job(cfg, folder):
    with job_resources(cfg, folder):
        return assigned_devices(1)


def test_one_job_at_a_time_keeps_the_configured_devices(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = OmegaConf.create({"trainer": {"devices": 2, "accelerator": "gpu"}})
    with job_resources(cfg, tmp_path) as devices:
        assert devices is None
        assert assigned_devices(2) == 2


WRITER = """
import sys, time
from omegaconf import OmegaConf
from transferlab.tracking.run import RunTracker
tracker = RunTracker(OmegaConf.create({"uri": sys.argv[1], "experiment": "writers", "artifact_root": None,
                                       "retry_seconds": 30, "fallback_dir": sys.argv[3]}))
tracker.start(f"w{sys.argv[2]}", {"writer": sys.argv[2]})
tracker.log_params({f"p{i}": str(i) for i in range(30)})
for epoch in range(15):
    tracker.log_metrics({f"m{i}": epoch + i for i in range(8)}, step=epoch)
tracker.log_text("done", "note.txt")
tracker.end()
"""


@pytest.mark.slow
def test_parallel_writers_lose_nothing(store, tmp_path) -> None:
    """Four processes log into one SQLite store (WAL) at once: every run, param and metric arrives."""
    from transferlab.tracking.run import experiment_id

    cfg = OmegaConf.create({"uri": store, "experiment": "writers", "artifact_root": None})
    experiment_id(cfg)  # the sweep creates the store and experiment before its jobs start
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, store, str(i), str(tmp_path / "unsaved")]) for i in range(4)
    ]
    assert [w.wait(timeout=300) for w in writers] == [0] * 4
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("writers").experiment_id])
    assert sorted(r.data.tags["writer"] for r in runs) == [str(i) for i in range(4)]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(r.data.params) == 30
        for i in range(8):
            assert [m.value for m in client.get_metric_history(r.info.run_id, f"m{i}")] == [e + i for e in range(15)]
    assert not (tmp_path / "unsaved").exists()  # nothing fell back to local files


def test_slurm_launcher_runs_one_task_per_gpu() -> None:
    from transferlab.config import compose_config

    cfg = compose_config(["hydra/launcher=slurm", "trainer.devices=4"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node) == (4, 4)
    assert launcher.max_num_timeout > 0  # requeued jobs resume from their per-job checkpoint
