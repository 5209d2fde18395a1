"""Sweep overhead and parallel speed-up, measured in one run on this machine.

Overhead per job = (wall time of an N-job `transferlab train -m` sweep - sum of its jobs'
`compute/fit_seconds`) / N, with Hydra's basic launcher (target < 2 s). Speed-up = wall of the
same sweep with the basic launcher / with the joblib launcher and 2 workers (threads per job =
cores / 2). `python benchmarks/bench_sweep.py [jobs]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

JOB = [
    "backbone.weights=scratch",
    "data=digits",
    "data.samples_per_class=20",
    "data.augment=none",
    "trainer.max_epochs=3",
    "trainer.min_steps=0",
    "trainer.accelerator=cpu",
]


def sweep(folder: Path, study: str, jobs: int, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, sum of the jobs' fit seconds)."""
    seeds = ",".join(str(i) for i in range(jobs))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "transferlab", "train", "-m", *JOB, f"study={study}", f"seed={seeds}", *extra]
    subprocess.run(cmd, cwd=folder, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id], "tags.`transferlab.role` = 'job'")
    assert len(runs) == jobs, f"{len(runs)} of {jobs} jobs logged"
    return wall, sum(r.data.metrics["compute/fit_seconds"] for r in runs)


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    folder = Path(tempfile.mkdtemp())
    try:
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # migrate once
        basic_wall, basic_fit = sweep(folder, "basic", jobs, [])
        joblib_wall, _ = sweep(folder, "joblib", jobs, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    overhead = (basic_wall - basic_fit) / jobs
    print(f"{jobs}-job sweep of a tiny CPU job, {os.cpu_count()} cores")
    print("| measure | value |\n|---|---|")
    print(f"| basic launcher: wall / sum of fit times | {basic_wall / basic_fit:.2f} |")
    print(f"| basic launcher: overhead per job (s, target < 2) | {overhead:.2f} |")
    print(f"| joblib, 2 workers: speed-up over basic (wall ratio) | {basic_wall / joblib_wall:.2f} |")


if __name__ == "__main__":
    main()
