"""Successive halving (hydra/sweeper=halving): rungs, the pruner, the books, promotion by resume."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf

from conftest import FAST
from transferlab import tags
from transferlab.config import compose_config
from transferlab.jobs.ledger import JobRecord, SweepLedger
from transferlab.jobs.returns import JobOutcome
from transferlab.studies.halving import (
    HalvingSweep,
    RungPruner,
    Settings,
    configurations,
    planned_launches,
    rung_budgets,
)
from transferlab.studies.halving_report import halving_section, load_pruned
from transferlab.tracking.identity import config_hash, stored_config


@pytest.mark.parametrize(
    ("min_budget", "eta", "max_budget", "expected"),
    [(1, 3, 9, [1, 3, 9]), (1, 3, 6, [1, 3, 6]), (2, 2, 8, [2, 4, 8]), (1, 2, 5, [1, 2, 4, 5]), (3, 3, 2, [2])],
)
def test_rung_budgets_grow_by_eta_and_end_at_max_epochs(min_budget, eta, max_budget, expected) -> None:
    assert rung_budgets(min_budget, eta, max_budget) == expected


def test_a_grid_is_configurations_of_seeds_in_targets() -> None:
    """The default study's shape: an experiment's grid, the command line overriding one key."""
    grid = {"data": "animals_similar,digits", "data.samples_per_class": "5,null", "finetune": "probe,fine_tune"}
    grid |= {"seed": "0,1,2"}
    fixed, found = configurations(["experiment=default", "finetune=scratch,probe,probe_early,fine_tune"], grid)
    assert fixed == ["experiment=default"]
    assert len(found) == 16
    assert {c.seeds for c in found} == {("0", "1", "2")}
    assert sorted({c.target for c in found}) == [
        "data=animals_similar data.samples_per_class=5",
        "data=animals_similar data.samples_per_class=null",
        "data=digits data.samples_per_class=5",
        "data=digits data.samples_per_class=null",
    ]
    (probe,) = [c for c in found if c.key == "data=digits data.samples_per_class=5 finetune=probe_early"]
    jobs = probe.jobs(fixed, 2)
    assert jobs[2] == [*fixed, *probe.overrides, "seed=2", "trainer.stop_after_epochs=2"]
    assert probe.jobs(fixed, None)[0][-1] == "trainer.stop_after_epochs=null"


def test_max_epochs_cannot_be_swept_under_halving() -> None:
    with pytest.raises(Exception, match="trainer.max_epochs is the halving sweep's full budget"):
        configurations(["trainer.max_epochs=2,4", "seed=0,1"], None)


# Eight configurations of one rung, reported at once; the best two (8 // 3) must survive.
RUNG = [0.30, 0.55, 0.90, 0.10, 0.85, 0.40, 0.20, 0.60]


def _reported_rung(pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, list[optuna.Trial]]:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    trials = [study.ask() for _ in RUNG]
    for trial, value in zip(trials, RUNG):
        trial.report(value, step=1)
    return study, trials


def test_rung_pruner_keeps_the_best_of_the_whole_rung_in_any_order() -> None:
    study, trials = _reported_rung(RungPruner(eta=3))
    for order in (trials, trials[::-1]):
        assert [RUNG[t.number] for t in order if not t.should_prune()] in ([0.90, 0.85], [0.85, 0.90])


def test_asha_promotes_by_ask_order_when_a_rung_reports_at_once() -> None:
    """Why the default pruner is not Optuna's SuccessiveHalvingPruner: asked one by one after a
    synchronous rung, ASHA compares each trial only with those asked before it."""
    study, trials = _reported_rung(optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    promoted = [RUNG[t.number] for t in trials if not t.should_prune()]
    assert 0.30 in promoted  # the first asked, 6th of 8, survives
    assert promoted != [0.90, 0.85]


def test_stop_after_epochs_is_not_part_of_a_jobs_identity(cfg) -> None:
    stopped = cfg.copy()
    OmegaConf.update(stopped, "trainer.stop_after_epochs", 2)
    assert config_hash(stopped) == config_hash(cfg)  # same checkpoint dir and MLflow run at every rung
    assert stored_config(stopped).trainer.stop_after_epochs is None  # a reproduction trains to the end
    other = cfg.copy()
    OmegaConf.update(other, "trainer.max_epochs", 7)
    assert config_hash(other) != config_hash(cfg)


# --- the rung loop with a pretend launcher: jobs whose val/acc curve is known -------------------
BASE = {("5", "0"): 0.50, ("5", "1"): 0.80, ("5", "2"): 0.60, ("5", "3"): 0.70}
BASE |= {("10", "0"): 0.90, ("10", "1"): 0.30, ("10", "2"): 0.40, ("10", "3"): 0.20}
GRID = {"data.samples_per_class": "5,10", "finetune.freeze_depth": "0,1,2,3", "seed": "0,1"}


class PretendJobs:
    """Each job logs `val/acc` = base + 0.01 x epoch (+ 0.001 x seed) per epoch up to its
    `trainer.stop_after_epochs` (or 4), continuing its own run; it leaves a checkpoint dir."""

    def __init__(self, cache: Path, fail_on_launch: int | None = None, score=None, ledger=None, length=None) -> None:
        self.cache, self.fail_on_launch, self.launches, self.epochs = cache, fail_on_launch, [], 0
        self.length = length or (lambda o: 4)  # epochs of the job's whole plan (1: done within the first rung)
        self.ledger, self.totals = ledger, []  # the job lines' N as each launch starts
        self.score = score or (lambda o: BASE[(o["data.samples_per_class"], o["finetune.freeze_depth"])])
        self.client = mlflow.MlflowClient()

    def __call__(self, batch: list[list[str]]) -> list[SimpleNamespace]:
        if len(self.launches) == self.fail_on_launch:
            raise KeyboardInterrupt  # the sweep is killed before this rung
        self.launches.append(batch)
        if self.ledger is not None:
            self.totals.append(self.ledger.meta["total"])
        exp = self.client.get_experiment_by_name("fake").experiment_id
        returns = []
        for job in batch:
            o = dict(x.split("=", 1) for x in job)
            cfg = OmegaConf.create(
                {
                    "point": {k: v for k, v in o.items() if k not in ("seed", "trainer.stop_after_epochs")},
                    "seed": o["seed"],
                    "cache_dir": str(self.cache),
                    "trainer": {"stop_after_epochs": o["trainer.stop_after_epochs"]},
                }
            )
            key = config_hash(cfg)
            (self.cache / "jobs" / key).mkdir(parents=True, exist_ok=True)
            found = self.client.search_runs([exp], f"tags.`{tags.CONFIG_HASH}` = '{key}'")
            run_id = (
                found[0].info.run_id if found else self.client.create_run(exp, tags={tags.CONFIG_HASH: key}).info.run_id
            )
            done = len(self.client.get_metric_history(run_id, "val/acc"))
            length = self.length(o)
            stop = length if o["trainer.stop_after_epochs"] == "null" else int(o["trainer.stop_after_epochs"])
            stop = min(stop, length)
            base = self.score(o) + 0.001 * int(o["seed"])
            for epoch in range(done, stop):
                self.client.log_metric(run_id, "val/acc", base + 0.01 * epoch, step=epoch)
                self.epochs += 1
            status = "FINISHED" if stop == length else "PAUSED"
            self.client.set_terminated(run_id, "FINISHED" if stop == length else "SCHEDULED")
            returns.append(SimpleNamespace(return_value=JobOutcome(status, math.nan, run_id, key, str(self.cache))))
        return returns


def _sweep(tmp_path: Path, launch: PretendJobs, settings: Settings | None = None) -> HalvingSweep:
    config = OmegaConf.create(
        {
            "study": "fake",
            "trainer": {"max_epochs": 4},
            "tracking": {"uri": None, "experiment": "fake", "artifact_root": None},
        }
    )
    return HalvingSweep(settings or Settings(eta=2, min_budget=1), config, launch, tmp_path / "sweep")


def _runs_by_point(store: str) -> dict[tuple[str, str], list]:
    client = mlflow.MlflowClient(store)
    out: dict[tuple[str, str], list] = {}
    for run in client.search_runs([client.get_experiment_by_name("fake").experiment_id]):
        for point, base in BASE.items():
            value = run.data.metrics["val/acc"]
            if any(math.isclose(value, base + 0.001 * s + 0.01 * e) for s in (0, 1) for e in range(4)):
                out.setdefault(point, []).append(run)
    return out


def test_halving_prunes_per_target_and_marks_the_pruned_runs(store: str, tmp_path: Path) -> None:
    jobs = PretendJobs(tmp_path / "cache")
    winners = _sweep(tmp_path, jobs).run([], GRID)
    assert winners == {
        "data.samples_per_class=5": "data.samples_per_class=5 finetune.freeze_depth=1",
        "data.samples_per_class=10": "data.samples_per_class=10 finetune.freeze_depth=0",
    }
    assert [len(b) for b in jobs.launches] == [16, 8, 4]  # 8 configs x 2 seeds, then the best half, then 1 per target
    assert jobs.epochs == 16 * 1 + 8 * 1 + 4 * 2  # 32 of the full grid's 64 epochs
    runs = _runs_by_point(store)
    expected = {("5", "0"): 1, ("5", "2"): 1, ("10", "1"): 1, ("10", "3"): 1, ("5", "3"): 2, ("10", "2"): 2}
    for point, rung in expected.items():
        assert len(runs[point]) == 2
        for run in runs[point]:
            assert run.info.status == "KILLED"
            assert run.data.tags[tags.PRUNED].startswith(f"rung {rung} (budget {rung} epochs): rank ")
            assert not (tmp_path / "cache" / "jobs" / run.data.tags[tags.CONFIG_HASH]).exists()
    assert runs[("5", "2")][0].data.tags[tags.PRUNED].split(": ")[1].startswith("rank 3 of 4, score 60.")
    for point in (("5", "1"), ("10", "0")):
        assert {r.info.status for r in runs[point]} == {"FINISHED"}
        assert {r.data.tags.get(tags.PRUNED) for r in runs[point]} == {None}


def test_a_configuration_whose_jobs_finish_within_a_rung_is_complete_not_pruned(store: str, tmp_path: Path) -> None:
    """An L-BFGS probe's whole plan fits in the first rung: its runs stay FINISHED (never KILLED
    or tagged pruned), it is not launched again, and it can still win its target."""
    one_shot = {"1", "3"}  # freeze depths whose jobs finish at epoch 1
    jobs = PretendJobs(tmp_path / "cache", length=lambda o: 1 if o["finetune.freeze_depth"] in one_shot else 4)
    winners = _sweep(tmp_path, jobs).run([], GRID)
    # depth 1 on 5 per class scores best there (0.80) and finished in rung 1: it wins without more launches
    assert winners["data.samples_per_class=5"] == "data.samples_per_class=5 finetune.freeze_depth=1"
    assert winners["data.samples_per_class=10"] == "data.samples_per_class=10 finetune.freeze_depth=0"
    launched = [dict(x.split("=", 1) for x in job) for batch in jobs.launches for job in batch]
    for depth in one_shot:
        assert sum(o["finetune.freeze_depth"] == depth for o in launched) == 4  # 2 targets x 2 seeds, once
    runs = _runs_by_point(store)
    for point in (("5", "1"), ("5", "3"), ("10", "1"), ("10", "3")):
        assert {r.info.status for r in runs[point]} == {"FINISHED"}
        assert {r.data.tags.get(tags.PRUNED) for r in runs[point]} == {None}
    # the epoch-trained configurations below the cutoff are still pruned
    assert {r.info.status for r in runs[("5", "0")]} == {"KILLED"}
    assert {r.info.status for r in runs[("10", "2")]} == {"KILLED"}


@pytest.mark.parametrize(
    ("alive", "rungs", "eta", "per_config", "expected"),
    [([4, 4], 3, 2, 2, 28), ([9], 3, 3, 1, 13), ([2], 3, 3, 1, 4), ([0, 3], 2, 3, 2, 8), ([5], 0, 2, 3, 0)],
)
def test_planned_launches_keep_a_third_or_half_per_rung_and_target(alive, rungs, eta, per_config, expected) -> None:
    assert planned_launches(alive, rungs, eta, per_config) == expected


@pytest.mark.parametrize(
    ("score", "launches", "totals"),
    [
        (None, [16, 8, 4], [28, 28, 28]),  # 4 configurations x 2 seeds per target, halved per rung
        (lambda o: 0.5, [16, 16, 16], [28, 40, 48]),  # every score ties: none is pruned, N re-planned
    ],
    ids=["halved", "ties"],
)
def test_the_job_counter_counts_launches_against_the_planned_total(store, tmp_path, score, launches, totals) -> None:
    """[job k/N]: k never passes N, though halving launches a job once per rung and ties at a
    rung's cutoff promote more configurations than planned; the line names the rung."""
    ledger = SweepLedger(tmp_path / "sweep")
    jobs = PretendJobs(tmp_path / "cache", score=score, ledger=ledger)
    _sweep(tmp_path, jobs).run([], GRID)
    assert [len(b) for b in jobs.launches] == launches
    assert jobs.totals == totals
    ends = [sum(launches[: i + 1]) for i in range(len(launches))]  # the last job number of each rung
    assert all(end <= total for end, total in zip(ends, totals))
    line = ledger.progress_line(JobRecord(launches[0] + 1, "PAUSED", "seed=1", 1.0))
    assert line.startswith(f"[job {launches[0] + 2}/{totals[-1]} rung 2/3] PAUSED seed=1 | ")
    first = ledger.progress_line(JobRecord(0, "PAUSED", "seed=0", 1.0))
    assert first.startswith(f"[job 1/{totals[-1]} rung 1/3] PAUSED")


def test_a_killed_halving_sweep_resumes_at_its_rung(store: str, tmp_path: Path) -> None:
    killed = PretendJobs(tmp_path / "cache", fail_on_launch=1)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, killed).run([], GRID)
    resumed = PretendJobs(tmp_path / "cache")
    winners = _sweep(tmp_path, resumed).run([], GRID)  # same storage: <sweep dir>/halving.db
    assert [len(b) for b in resumed.launches] == [8, 4]  # rung 1 is not run again
    assert killed.epochs + resumed.epochs == 32
    assert winners["data.samples_per_class=10"] == "data.samples_per_class=10 finetune.freeze_depth=0"


def test_sampling_mode_halves_each_wave_of_tpe_samples(store: str, tmp_path: Path) -> None:
    """optim.lr sampled from a range (4 per target and wave, 2 waves); the jobs' score peaks at
    lr = 0.01 and keeps its order at every rung, so the winner is the best of the 8 sampled."""
    jobs = PretendJobs(tmp_path / "cache", score=lambda o: 0.9 - 0.1 * abs(math.log10(float(o["optim.lr"])) + 2))
    search = {"optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    settings = Settings(eta=2, min_budget=1, search=search, n_trials=4, waves=2)
    winners = _sweep(tmp_path, jobs, settings).run([], {"data.samples_per_class": "5,10", "seed": "0,1"})
    assert [len(b) for b in jobs.launches] == [16, 8, 4, 16, 8, 4]
    for target in ("data.samples_per_class=5", "data.samples_per_class=10"):
        first = [dict(x.split("=", 1) for x in j) for b in jobs.launches[::3] for j in b if target in j]
        lrs = {float(o["optim.lr"]) for o in first}
        assert len(lrs) == 8  # 4 new configurations per wave
        assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
        best = min(lrs, key=lambda lr: abs(math.log10(lr) + 2))
        assert winners[target] == f"{target} optim.lr={best:.4g}"
    with pytest.raises(Exception, match="sweep only data. keys and seed, not .'finetune.freeze_depth'."):
        _sweep(tmp_path, jobs, settings).run([], GRID)


def test_the_searched_lr_mult_study_samples_per_target() -> None:
    cfg = compose_config(["experiment=lr_mult_search"], hydra_cfg=True)
    assert cfg.hydra.sweeper.search["finetune.layer_decay"] == {"low": 0.5, "high": 1.0}
    _, found = configurations(["experiment=lr_mult_search"], OmegaConf.select(cfg, "hydra.sweeper.params"))
    assert len(found) == 4
    assert {c.overrides for c in found} == {(c.target.split()[0], c.target.split()[1]) for c in found}


def test_the_report_lists_pruned_configurations_by_rung() -> None:
    import pandas as pd

    pruned = pd.DataFrame(
        [
            {"rung": 2, "target": "digits / 50 train", "configuration": "digits-5/class-probe", "condition_hash": "b"}
            | {"seed": s, "reason": "rung 2 (budget 3 epochs): rank 2 of 2, score 40.0 < cutoff 50.0"}
            for s in ("10", "2")
        ]
        + [
            {"rung": 1, "target": "digits / 50 train", "configuration": "digits-5/class-scratch", "condition_hash": "a"}
            | {"seed": "0", "reason": "rung 1 (budget 1 epochs): rank 4 of 4, score 10.0 < cutoff 30.0"}
        ]
    )
    text = halving_section(pruned, pd.DataFrame({"condition_hash": ["c", "c", "d"]}))
    assert "- 4 configurations compared: 2 trained to the full budget" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows == [
        "| 1 | digits / 50 train | digits-5/class-scratch | 0 | rank 4 of 4, score 10.0 < cutoff 30.0 |",
        "| 2 | digits / 50 train | digits-5/class-probe | 2 10 | rank 2 of 2, score 40.0 < cutoff 50.0 |",
    ]
    assert halving_section(pruned.iloc[:0], pd.DataFrame()) == ""


# --- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_promoted_job_ends_with_the_metrics_of_a_straight_run(store: str, tmp_path: Path) -> None:
    """Rung 1 stops the job after 2 of 3 epochs (inside its second phase) and leaves its run
    SCHEDULED; the promotion continues the same run to exactly the metrics of an unbroken run."""
    from transferlab.jobs.run import run

    job = [*FAST, "data.samples_per_class=10", "finetune=head_then_all", "finetune.head_epochs=1"]
    job += ["trainer.max_epochs=3"]
    partial = run(compose_config([*job, "study=halved", "trainer.stop_after_epochs=2"]))
    client = mlflow.MlflowClient(store)
    (paused,) = client.search_runs([client.get_experiment_by_name("halved").experiment_id])
    assert paused.info.status == "SCHEDULED"
    assert partial["compute/epochs"] == 2
    assert "test/acc" not in paused.data.metrics
    promoted = run(compose_config([*job, "study=halved"]))
    straight = run(compose_config([*job, "study=straight"]))
    (after,) = client.search_runs([client.get_experiment_by_name("halved").experiment_id])
    assert after.info.run_id == paused.info.run_id
    assert after.info.status == "FINISHED"
    for key in ("test/acc", "test/loss", "test/f1", "compute/epochs", "compute/train_samples", "compute/train_flops"):
        assert promoted[key] == straight[key], key
    assert sorted(m.step for m in client.get_metric_history(after.info.run_id, "train/loss")) == [0, 1, 2]
    assert after.data.params["trainer.stop_after_epochs"] == "None"  # the stored config trains to the end


@pytest.mark.slow
def test_a_promoted_job_with_augmentation_ends_with_the_metrics_of_a_straight_run(store: str) -> None:
    """Augmentation draws from the global torch RNG, and so does building a train iterator (its
    base seed). A resumed fit builds its first iterator inside `configure_optimizers`, so the RNG
    is restored when Lightning loads the callback state, before that draw: found by
    `bench_halving.py --experiment backbones --min-budget 2`, where promoted jobs drifted from the grid's."""
    from transferlab.jobs.run import run

    job = [o for o in FAST if not o.startswith(("data.augment=", "trainer.min_steps="))]
    job += ["data.augment=light", "data.samples_per_class=10", "finetune=fine_tune", "trainer.max_epochs=6"]
    run(compose_config([*job, "study=halved_aug", "trainer.stop_after_epochs=2"]))  # 60 steps: 30 epochs, stop at 10
    promoted = run(compose_config([*job, "study=halved_aug"]))
    straight = run(compose_config([*job, "study=straight_aug"]))
    client = mlflow.MlflowClient(store)

    def curve(study: str) -> list[float]:
        (r,) = client.search_runs([client.get_experiment_by_name(study).experiment_id])
        return [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val/acc"), key=lambda m: m.step)]

    assert len(curve("straight_aug")) == 6
    assert curve("halved_aug") == curve("straight_aug")
    for key in ("test/acc", "test/loss", "compute/train_samples"):
        assert promoted[key] == straight[key], key


JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def _halving_sweep(study: str, *extra: str) -> int:
    """`transferlab train -m` in this process (imports already paid): 2 configurations x 2 seeds."""
    from transferlab.cli import main

    args = ["train", "-m", *FAST, "trainer.max_epochs=2", f"study={study}", "hydra/sweeper=halving"]
    return main([*args, "hydra.sweeper.eta=2", "finetune.freeze_depth=0,all", "seed=0,1", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], JOBLIB], ids=["basic", "joblib"])
def test_halving_sweep_through_a_launcher(store: str, tmp_path: Path, launcher: list[str], capfd) -> None:
    """Two configurations x two seeds, budgets 1 and 2 epochs: rung 1 runs four jobs, one
    configuration is pruned (its runs KILLED, tagged, listed in the report), the other finishes."""
    assert _halving_sweep("halving", *launcher) == 0
    out = capfd.readouterr().out
    assert "rung 1/2 (budget 1 of 2 epochs): 2 configurations alive, 4 jobs to run" in out
    assert "rung 2/2 (budget 2 of 2 epochs): 1 configurations alive, 2 jobs to run" in out
    heads = sorted(line.split("]")[0] + "]" for line in out.splitlines() if line.startswith("[job "))
    assert heads == [f"[job {k}/6 rung {1 if k <= 4 else 2}/2]" for k in range(1, 7)]  # 4 + 2 launches
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("halving").experiment_id], tags.role_query("job"))
    assert len(runs) == 4  # promoted jobs continued their runs
    by_status = {s: [r for r in runs if r.info.status == s] for s in ("FINISHED", "KILLED")}
    assert [len(by_status["FINISHED"]), len(by_status["KILLED"])] == [2, 2]
    assert len({r.data.params["finetune.freeze_depth"] for r in by_status["KILLED"]}) == 1
    for r in by_status["KILLED"]:
        assert r.data.tags[tags.PRUNED].startswith("rung 1 (budget 1 epochs): rank 2 of 2, score ")
        assert r.data.metrics["compute/epochs"] == 1
        assert r.data.metrics["compute/train_flops"] > 0  # the partial cost, for FLOPs accounting
    for r in by_status["FINISHED"]:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val/acc")) == [0, 1]
    report = (tmp_path / "reports" / "halving" / "report.md").read_text()
    assert "- 2 finished job runs counted; skipped: 2 job runs not FINISHED" in report
    assert "- 2 configurations compared: 1 trained to the full budget" in report
    assert len(load_pruned(client, "halving")) == 2
    (parent,) = client.search_runs([runs[0].info.experiment_id], tags.role_query("sweep"))
    assert parent.data.metrics[f"{tags.SWEEP_COUNT}pruned"] == 2  # the parent run's count of pruned job runs
    assert list((tmp_path / "multirun").rglob("halving.db"))  # the Optuna books, for a resume


@pytest.mark.slow
def test_halving_on_a_local_ray_cluster_runs_each_rung_in_parallel(store: str, tmp_path: Path) -> None:
    """hydra/sweeper=halving hydra/launcher=ray (a local Ray instance of 2 CPUs): each rung's jobs
    are Ray tasks in worker processes, at once; pruning and promotion work as with the others."""
    import json
    import os
    import subprocess
    import sys

    args = ["train", "-m", *FAST, "trainer.max_epochs=2", "study=halving_ray", "hydra/sweeper=halving"]
    args += ["hydra.sweeper.eta=2", "finetune.freeze_depth=0,all", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    args += ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"]
    result = subprocess.run(
        [sys.executable, "-m", "transferlab", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "[job " in line]
    assert all("_run_job pid=" in line for line in lines)  # Ray prefixes its tasks' output
    heads = sorted(line.split("[job ")[1].split("]")[0] for line in lines)
    assert heads == [f"{k}/6 rung {1 if k <= 4 else 2}/2" for k in range(1, 7)]
    assert len({line.split("pid=")[1].split(")")[0] for line in lines}) >= 2  # more than one worker
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep" / "jobs").glob("[0-9]*.json")]
    rung1 = sorted((r["ended"] - r["seconds"], r["ended"]) for r in records if r["num"] < 4)
    assert len(rung1) == 4
    assert any(b[0] < a[1] for a, b in zip(rung1, rung1[1:])), rung1  # a job started before another ended
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("halving_ray").experiment_id], tags.role_query("job"))
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    assert "halving winner for all: finetune.freeze_depth=" in result.stdout
