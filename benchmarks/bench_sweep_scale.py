"""A sweep of many tiny jobs: does the per-job cost stay flat, does memory stay put, how long
does the report take? Measured in one run on this machine.

N jobs (seeds 0..N-1) of a 1-epoch job on 20 digit images, through `transferlab train -m` with the
basic launcher (one process runs every job) or joblib (2 workers). From the sweep dir's job records:
- time per job = the interval between consecutive job ends, mean over the first and over the last
  `--window` jobs (target: flat within 20 %);
- RSS of the sweep process and its workers, sampled every 0.5 s: growth from job `--window` to the end
  (target < 100 MB);
- `transferlab report` on the N-job study, timed in this process (target < 30 s).

`OMP_NUM_THREADS=1 python benchmarks/bench_sweep_scale.py [--jobs 200] [--window 50] [--launcher basic|joblib]`
(RESULTS.md: `--jobs 1000 --window 100`, each launcher; CPU seconds per job are printed beside wall
time, since a shared machine's load stretches the latter.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil

JOB = [
    "backbone.weights=scratch",
    "data=digits",
    "data.samples_per_class=2",
    "data.augment=none",
    "trainer.max_epochs=1",
    "trainer.min_steps=0",
    "trainer.accelerator=cpu",
]
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def usage(process: psutil.Process) -> tuple[float, float]:
    """(RSS in MB, CPU seconds) of the process and every child (joblib workers)."""
    rss, cpu = 0, 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            rss, cpu = rss + p.memory_info().rss, cpu + sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return rss / 2**20, cpu


def run_sweep(folder: Path, jobs: int, launcher: str) -> tuple[float, list[tuple[float, float, float]], list[float]]:
    """(wall s, [(time, RSS MB, CPU s)], job end times in job order)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    seeds = ",".join(str(i) for i in range(jobs))
    cmd = [sys.executable, "-m", "transferlab", "train", "-m", *JOB, f"study=scale_{launcher}", f"seed={seeds}"]
    cmd += [f"hydra.sweep.dir={folder / 'sweep'}", *LAUNCHERS[launcher]]
    start = time.time()
    with open(folder / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched, samples = psutil.Process(proc.pid), []
        while proc.poll() is None:
            samples.append((time.time(), *usage(watched)))
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed: {(folder / 'sweep.log').read_text()[-3000:]}")
    records = [json.loads(p.read_text()) for p in (folder / "sweep" / "jobs").glob("[0-9]*.json")]
    ends = sorted(r["ended"] for r in records)
    assert len(ends) == jobs, f"{len(ends)} of {jobs} job records"
    return time.time() - start, samples, ends


def usage_at(samples: list[tuple[float, float, float]], when: float, column: int = 1) -> float:
    return min(samples, key=lambda s: abs(s[0] - when))[column]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="basic")
    parser.add_argument("--window", type=int, default=50, help="jobs compared at the start and at the end")
    opts = parser.parse_args()
    window = opts.window
    assert opts.jobs >= 2 * window, f"at least {2 * window} jobs: the first and last {window} are compared"
    folder = Path(tempfile.mkdtemp())
    began, load = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()[0]
    try:
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # migrate once
        wall, samples, ends = run_sweep(folder, opts.jobs, opts.launcher)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        from transferlab.studies.report import write_report

        start = time.perf_counter()
        write_report(f"scale_{opts.launcher}", folder / "report")
        report_s = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    first, last = sum(gaps[: window - 1]) / (window - 1), sum(gaps[-(window - 1) :]) / (window - 1)
    grown = usage_at(samples, ends[-1]) - usage_at(samples, ends[window - 1])
    ended = time.strftime("%H:%M:%S UTC", time.gmtime())
    print(f"{began} to {ended}; {os.cpu_count()} cores; load average {load:.1f} at start, ", end="")
    print(f"{os.getloadavg()[0]:.1f} at end; launcher {opts.launcher}")
    print("| measure | value | target |\n|---|---|---|")
    print(f"| jobs | {opts.jobs} | |")
    print(f"| sweep wall (s) | {wall:.0f} | |")
    print(f"| first job ended (s after the command started: checks, Hydra, job 1) | {ends[0] - samples[0][0]:.1f} | |")
    print(f"| s per job, first {window} jobs | {first:.2f} | |")
    print(f"| s per job, last {window} jobs | {last:.2f} | |")
    print(f"| last / first | {last / first:.2f} | within 1.2 |")
    # CPU seconds per job (sweep process and workers): what the machine's load does not stretch
    cpu_first = (usage_at(samples, ends[window - 1], 2) - usage_at(samples, ends[0], 2)) / (window - 1)
    cpu_last = (usage_at(samples, ends[-1], 2) - usage_at(samples, ends[-window], 2)) / (window - 1)
    ratio = cpu_last / cpu_first
    print(
        f"| CPU s per job, first / last {window} jobs | {cpu_first:.2f} / {cpu_last:.2f} ({ratio:.2f}x) | within 1.2 |"
    )
    print(f"| RSS after job {window} (MB) | {usage_at(samples, ends[window - 1]):.0f} | |")
    print(f"| RSS growth, job {window} to the last (MB) | {grown:+.0f} | < 100 |")
    print(f"| peak RSS (MB) | {max(s[1] for s in samples):.0f} | |")
    tenths = [ends[max(0, len(ends) * q // 10 - 1)] for q in range(1, 11)]
    shown = ", ".join(f"{usage_at(samples, t):.0f}" for t in tenths)
    print(f"| RSS (MB) after each tenth of the jobs | {shown} | |")
    chunk = max(1, len(gaps) // 10)
    shown = ", ".join(f"{sum(gaps[i : i + chunk]) / len(gaps[i : i + chunk]):.2f}" for i in range(0, len(gaps), chunk))
    print(f"| s per job, each tenth of the jobs | {shown} | |")
    print(f"| report on {opts.jobs} runs (s) | {report_s:.1f} | < 30 |")


if __name__ == "__main__":
    main()
