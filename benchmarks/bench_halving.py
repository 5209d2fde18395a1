"""Successive halving against the full grid, both run here, one after the other, in one run.

A small version of the default study (test_resnet from the cached animal source model, 32 px,
two targets of `--per-class` images per class, the four strategies x `--lrs` learning rates, three
seeds) runs twice: once as the full grid (basic sweeper) and once with `hydra/sweeper=halving`
(eta 3, rungs of 1, 3 and 6 epochs by default), each its own study in one MLflow store and one cache dir (the
source model's hash includes the cache dir). Halving runs first, so it pays for building the probes'
frozen-feature cache and the grid reuses it: the wall-time share is, if anything, unfair to halving
(FLOPs are not affected: the cache build is its own column, not `compute/train_flops`). Per target:
- the grid's winner (highest mean test accuracy over seeds);
- the configuration halving trained to the end;
- the paired verdict of the two on the grid's own runs (studies/stats.py, as in the report).
It also gives halving's share of the grid's training FLOPs (`compute/train_flops`, pruned runs'
partial cost included) and of its wall time.

`OMP_NUM_THREADS=1 python benchmarks/bench_halving.py [--per-class 20] [--seeds 3] [--epochs 6] [--lrs 0.001,0.003]
[--backbone efficientnet_lite0]` (the last: ImageNet Lite0 at 64 px instead of test_resnet from the source,
jobs where fit time dominates the fixed per-job cost)

`--experiment default|backbones [--source-epochs 4] [--min-budget 2]`: instead, a study's own grid as users run it
(`transferlab train -m experiment=<name>`, its `hydra.sweeper.params`), grid against halving; the
grid's source models are pretrained first (`transferlab pretrain`, one per swept backbone), so
neither sweep pays for them. A configuration is every swept key but the seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from transferlab.config import compose_config
from transferlab.jobs.upstream import uses_source
from transferlab.studies.halving import rung_budgets
from transferlab.studies.stats import paired_p, verdict
from transferlab.tags import target_label

STRATEGIES = "scratch,probe,probe_early,fine_tune"
LRS = "0.001,0.003"
SOURCE = "backbone.source_overrides=['trainer.max_epochs=4']"  # a shorter source pretraining, same for both
HALVING = ["hydra/sweeper=halving", "hydra.sweeper.eta=3"]


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}


def sweep(folder: Path, study: str, cache: Path, job: list[str], extra: list[str]) -> float:
    """Wall seconds of one `transferlab train -m` (the process, imports included)."""
    cmd = [sys.executable, "-m", "transferlab", "train", "-m", *job, f"study={study}", f"cache_dir={cache}", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=_env(folder), capture_output=True, text=True)
    wall = time.perf_counter() - start
    (folder / f"{study}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{study} failed:\n{done.stderr[-3000:]}")
    return wall


CONFIG_PARAMS = ("backbone.name", "backbone.weights", "finetune.strategy", "finetune.truncate_after", "optim.lr")


def job_runs(client: mlflow.MlflowClient, study: str) -> pd.DataFrame:
    """One row per job run; `config` names the parameters that differ between configurations."""
    exp = client.get_experiment_by_name(study)
    rows = []
    for run in client.search_runs([exp.experiment_id], "tags.`transferlab.role` = 'job'", max_results=5000):
        p, m = run.data.params, run.data.metrics
        rows.append(
            {
                "target": target_label(p["data.name"], m.get("data/train_size")),
                "config": {k: p.get(k, "") for k in CONFIG_PARAMS},
                "seed": int(p["seed"]),
                "status": run.info.status,
                "test_acc": 100 * m.get("test/acc", np.nan),
                "train_flops": m.get("compute/train_flops", 0.0),
                "test_size": m.get("data/test_size", np.nan),
            }
        )
    return pd.DataFrame(rows)


def label_configs(*frames: pd.DataFrame) -> None:
    """`config` as a short label: the parameters whose value differs across the runs, in place."""
    keys = [k for k in CONFIG_PARAMS if len({f["config"][k] for df in frames for f in df.to_dict("records")}) > 1]
    for df in frames:
        df["config"] = [
            " ".join(c[k] if k != "optim.lr" else f"lr={c[k]}" for k in keys if c[k] not in ("", "None"))
            for c in df["config"]
        ]


def experiment_grid(name: str) -> dict[str, list[str]]:
    """The experiment's own sweep (conf/experiment/<name>.yaml), key -> values."""
    params = OmegaConf.load(Path(__file__).parents[1] / "conf" / "experiment" / f"{name}.yaml").hydra.sweeper.params
    return {k: str(v).split(",") for k, v in params.items()}


def pretrain_sources(folder: Path, cache: Path, job: list[str], grid: dict[str, list[str]]) -> None:
    """Train each source model the grid needs, before either sweep (a backbone without a source is skipped)."""
    key = next((k for k in ("backbone.name", "backbone") if k in grid), None)
    for value in grid.get(key, [None]):
        chosen = [f"{key}={value}"] if value else []
        if not uses_source(compose_config([*job, *chosen])):  # ImageNet weights: no source
            continue
        cmd = [sys.executable, "-m", "transferlab", "pretrain", *job, *chosen, f"cache_dir={cache}"]
        done = subprocess.run(cmd, cwd=folder, env=_env(folder), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pretrain {chosen} failed:\n{done.stderr[-3000:]}")


def compare(grid: pd.DataFrame, halving: pd.DataFrame) -> list[list[str]]:
    rows = []
    for target, g in grid.groupby("target"):
        means = g.groupby("config")["test_acc"].mean().sort_values(ascending=False)
        best = means.index[0]
        finished = halving[(halving["target"] == target) & (halving["status"] == "FINISHED")]
        picks = finished.groupby("config")["test_acc"].mean().sort_values(ascending=False)
        pick = picks.index[0] if len(picks) else "none"
        acc = g.pivot(index="seed", columns="config", values="test_acc")
        diffs = (acc[best] - acc[pick]).dropna().to_numpy() if pick in acc else np.array([])
        quantum = 100 / g["test_size"].min()
        said = "same configuration" if pick == best else verdict(diffs, paired_p(diffs), quantum)
        rank = list(means.index).index(pick) + 1 if pick in means.index else 0
        rows.append(
            [
                target,
                f"{best} ({means.iloc[0]:.1f})",
                f"{pick} ({picks.iloc[0]:.1f})" if len(picks) else "none",
                f"{rank} of {len(means)}",
                said,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lrs", default=LRS, help="optim.lr values of the grid")
    parser.add_argument("--keep", type=Path, default=None, help="keep the store and logs here")
    parser.add_argument("--cache", type=Path, default=None, help="cache dir (default: a new one; reuse a source model)")
    parser.add_argument(
        "--backbone", default=None, help="a backbone config with its own weights (efficientnet_lite0), no source"
    )
    parser.add_argument("--experiment", default=None, help="a study's own grid instead (default, backbones)")
    parser.add_argument("--min-budget", type=int, default=1, help="epochs of halving's first rung")
    parser.add_argument("--source-epochs", type=int, default=None, help="with --experiment: shorter source models")
    opts = parser.parse_args()
    if opts.experiment:
        epochs = opts.source_epochs
        shorter = [f"backbone.source_overrides=['trainer.max_epochs={epochs}']"] if epochs else []
        job, grid = [f"experiment={opts.experiment}", *shorter, "trainer.accelerator=cpu"], []
        opts.epochs = int(OmegaConf.load(Path(__file__).parents[1] / "conf" / "trainer" / "default.yaml").max_epochs)
    else:
        source = [f"backbone={opts.backbone}"] if opts.backbone else [SOURCE]
        job = [*source, "data.augment=none", "trainer.accelerator=cpu", f"trainer.max_epochs={opts.epochs}"]
        grid = ["data=animals_similar,digits", f"data.samples_per_class={opts.per_class}", f"finetune={STRATEGIES}"]
        grid += [f"optim.lr={opts.lrs}", "seed=" + ",".join(map(str, range(opts.seeds)))]
    folder = opts.keep or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    cache = opts.cache or folder / "cache"
    try:
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # migrate once
        if opts.experiment:
            pretrain_sources(folder, cache, job, experiment_grid(opts.experiment))
        elif not opts.backbone:
            pretrain = [sys.executable, "-m", "transferlab", "pretrain", SOURCE, f"cache_dir={cache}"]
            subprocess.run(pretrain, cwd=folder, env=_env(folder), check=True, capture_output=True)
        halving = [*HALVING, f"hydra.sweeper.min_budget={opts.min_budget}"]
        halving_wall = sweep(folder, "bench_halving", cache, [*job, *grid], halving)
        grid_wall = sweep(folder, "bench_grid", cache, [*job, *grid], [])
        client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        full, halved = job_runs(client, "bench_grid"), job_runs(client, "bench_halving")
        label_configs(full, halved)
    finally:
        if opts.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{os.cpu_count()} cores; load average at end {os.getloadavg()[0]:.1f}")
    configs = full.groupby("target")["config"].nunique().max()
    seeds = full["seed"].nunique()
    print(
        f"{opts.experiment or 'small default'} grid: {full['target'].nunique()} targets x up to {configs} "
        f"configurations x {seeds} seeds = {len(full)} jobs, "
        f"{opts.epochs} epochs; halving: eta 3, rungs {rung_budgets(opts.min_budget, 3, opts.epochs)} epochs"
    )
    print("\n| target | grid winner (mean test %) | halving's pick (mean test %) | pick's rank in the grid | verdict |")
    print("|---|---|---|---|---|")
    for row in compare(full, halved):
        print("| " + " | ".join(row) + " |")
    pruned = int((halved["status"] == "KILLED").sum())
    print("\n| measure | grid | halving | halving / grid |\n|---|---|---|---|")
    print(f"| job runs (pruned) | {len(full)} | {len(halved)} ({pruned}) | |")
    flops = full["train_flops"].sum(), halved["train_flops"].sum()
    print(f"| training FLOPs (all runs) | {flops[0]:.3g} | {flops[1]:.3g} | {flops[1] / flops[0]:.0%} |")
    print(f"| wall time of the sweep (s) | {grid_wall:.0f} | {halving_wall:.0f} | {halving_wall / grid_wall:.0%} |")


if __name__ == "__main__":
    main()
