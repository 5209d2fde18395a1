"""Start-up: how soon the CLI answers, and how soon a sweep's second job trains.

1. `transferlab --help`, a mistyped field and a bad value: process start to exit (median of
   REPEATS fresh processes), and whether torch was imported on the way.
2. A sweep of SWEEP_JOBS jobs of the CLI in one process (the basic launcher): for each job,
   seconds from Hydra calling the task body to the first training step, and for the first job also
   from process start. Later jobs pay no import: what is left is the job's own set-up (their median).
3. One more job in a fresh process after that sweep (data store and MLflow store already made), as
   a launcher that starts a process per job (submitit, Ray, local_ddp) runs every job: process
   start to first training step, and the part of it that is importing torch and Lightning.
4. How long that process takes to end after the command returned: through `cli.entry` (the
   installed command) and, in another fresh process, through `cli.main` alone.

Run: `.venv/bin/python benchmarks/bench_startup.py` (about 1 min); it prints a markdown table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 5
SWEEP_JOBS = 4  # jobs 2..4 pay no import: their median is the job's own set-up
FAST = [
    "backbone.weights=scratch",
    "data=digits",
    "data.samples_per_class=5",
    "data.augment=none",
    "trainer.max_epochs=1",
    "trainer.min_steps=0",
    "trainer.accelerator=cpu",
]
CASES = {
    "`transferlab --help`": ["--help"],
    "typo: `train finetune.freeze_dept=2`": ["train", "finetune.freeze_dept=2"],
    "bad value: `train optim.lr=abc`": ["train", "optim.lr=abc"],
    "unknown group: `train backbone=nope`": ["train", "backbone=nope"],
}
TIMED_SWEEP = """
import json, os, sys, time
t0 = time.perf_counter()
from transferlab import cli
from transferlab.jobs import task
from transferlab.transfer.module import TransferModule

imported = time.perf_counter() - t0  # torch, Lightning, timm, torchmetrics: the job's own imports
marks = []
run_job, training_step, main = task.run_job, TransferModule.training_step, cli.main

def timed_job(cfg):
    marks.append({"start": time.perf_counter() - t0})
    return run_job(cfg)

def timed_step(self, *args, **kwargs):
    marks[-1].setdefault("first_step", time.perf_counter() - t0)
    return training_step(self, *args, **kwargs)

def timed_main():
    code = main()
    print("TIMES " + json.dumps({"code": code, "jobs": marks, "imported": imported, "returned": time.time()}))
    sys.stdout.flush()
    return code

task.run_job, TransferModule.training_step, cli.main = timed_job, timed_step, timed_main
sys.argv = ["transferlab", *sys.argv[1:]]
# the command as installed (`entry`: main, then a quick exit), or `main` alone (the exit before)
sys.exit(cli.entry() if os.environ.get("BENCH_EXIT", "entry") == "entry" else timed_main())
"""


def time_cli(argv: list[str], cwd: Path) -> tuple[float, bool]:
    """Median seconds from process start to exit, and whether torch got imported."""
    probe = "import sys, runpy; sys.argv = ['transferlab', *sys.argv[1:]]\n"
    probe += "try:\n    runpy.run_module('transferlab', run_name='__main__')\n"
    probe += "finally:\n    print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    times, torch = [], False
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe, *argv], cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        torch |= "TORCH True" in out.stderr
    return statistics.median(times), torch


def time_jobs(cwd: Path, args: list[str], exit_by: str = "entry") -> dict:
    """{"jobs": per-job marks, "imported": seconds to import the job's modules, "exit": seconds from
    the command's return to the process's end} of one CLI process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env["BENCH_EXIT"] = exit_by
    out = subprocess.run([sys.executable, "-c", TIMED_SWEEP, *args], cwd=cwd, env=env, capture_output=True, text=True)
    ended = time.time()
    line = next((x for x in out.stdout.splitlines() if x.startswith("TIMES ")), None)
    if line is None:
        raise SystemExit(out.stderr[-3000:])
    times = json.loads(line[len("TIMES ") :])
    return {**times, "exit": ended - times["returned"]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        print("| what | seconds | torch imported |\n|---|---|---|")
        for name, argv in CASES.items():
            seconds, torch = time_cli(argv, cwd)
            print(f"| {name} (median of {REPEATS}) | {seconds:.2f} | {'yes' if torch else 'no'} |")
        sweep = ["train", "-m", *FAST, "study=startup", "seed=" + ",".join(map(str, range(SWEEP_JOBS)))]
        jobs = time_jobs(cwd, sweep)["jobs"]
        first, later = jobs[0], [j["first_step"] - j["start"] for j in jobs[1:]]
        print(f"| sweep job 1: process start to first training step | {first['first_step']:.2f} | yes |")
        print(f"| sweep job 1: task body to first training step | {first['first_step'] - first['start']:.2f} | yes |")
        each = " / ".join(f"{t:.2f}" for t in later)
        name = f"sweep jobs 2-{len(jobs)}: task body to first training step, median ({each})"
        print(f"| {name} | {statistics.median(later):.2f} | - |")
        fresh = time_jobs(cwd, ["train", *FAST, "study=startup", f"seed={SWEEP_JOBS}"])
        step, imported = fresh["jobs"][0]["first_step"], fresh["imported"]
        name = "one more job in a fresh process (store and MLflow made): process start to first step"
        print(f"| {name} | {step:.2f} | yes |")
        name = "... of which importing the job's modules (torch, Lightning, timm, MLflow with them)"
        print(f"| {name} | {imported:.2f} | yes |")
        before = time_jobs(cwd, ["train", *FAST, "study=startup", f"seed={SWEEP_JOBS + 1}"], exit_by="main")
        name = "that job: from the command's return to the process's end, as installed (`cli.entry`)"
        print(f"| {name} | {fresh['exit']:.2f} | yes |")
        name = "the same with `cli.main` alone (the interpreter's full shutdown, as before)"
        print(f"| {name} | {before['exit']:.2f} | yes |")


if __name__ == "__main__":
    main()
