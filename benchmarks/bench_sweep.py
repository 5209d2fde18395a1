"""Sweep overhead and parallel speed-up, measured in one run on this machine.

Overhead per job = (wall time of an N-job `transferlab train -m` sweep - sum of its jobs'
`compute/fit_seconds`) / N, with Hydra's basic launcher (target < 2 s), on N tiny jobs. Speed-up =
wall of a 6-job sweep of longer jobs with the basic launcher / with the joblib launcher and 2
workers (threads per job = cores / 2). `python benchmarks/bench_sweep.py [N]`.
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


# Jobs long enough (a few seconds of fit each) that running two at once can pay for a second worker
# process (imports, data, model: a few seconds once per worker).
LONGER = ["data.samples_per_class=null", "trainer.max_epochs=24"]


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
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    folder = Path(tempfile.mkdtemp())
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    try:
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # migrate once
        basic_wall, basic_fit = sweep(folder, "basic", jobs, [])
        long_basic, long_fit = sweep(folder, "long_basic", 6, LONGER)
        long_joblib, _ = sweep(folder, "long_joblib", 6, [*LONGER, *joblib])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    overhead = (basic_wall - basic_fit) / jobs
    print(f"{os.cpu_count()} cores; load average at end {os.getloadavg()[0]:.1f}")
    print("| measure | value |\n|---|---|")
    print(f"| basic launcher, {jobs} tiny jobs: wall / sum of fit times | {basic_wall / basic_fit:.2f} |")
    print(f"| basic launcher, {jobs} tiny jobs: overhead per job (s, target < 2) | {overhead:.2f} |")
    print(f"| 6 longer jobs (mean fit {long_fit / 6:.1f} s), basic launcher: wall | {long_basic:.1f} s |")
    print(f"| the same, joblib with 2 workers: wall | {long_joblib:.1f} s |")
    print(f"| joblib, 2 workers: speed-up over basic (wall ratio) | {long_basic / long_joblib:.2f} |")


if __name__ == "__main__":
    main()
