"""End to end: real sweeps and runs into a temporary MLflow store, checked by reading it back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import FAST
from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.jobs.reproduce import check_targets, reproduce
from transferlab.jobs.run import run

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id])


def test_multirun_logs_one_child_run_per_job(store: str, tmp_path: Path) -> None:
    result = _cli("train", "-m", *FAST, "study=e2e", "finetune.freeze_depth=0,all", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(store, "e2e")
    jobs = [r for r in runs if r.data.tags.get("transferlab.role") == "job"]
    (parent,) = [r for r in runs if r.data.tags.get("transferlab.role") == "sweep"]
    assert len(jobs) == 2
    assert {r.info.status for r in jobs} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert {r.data.params["finetune.freeze_depth"] for r in jobs} == {"0", "all"}
    by_depth = {r.data.params["finetune.freeze_depth"]: r for r in jobs}
    client = mlflow.MlflowClient(store)
    for r in jobs:
        assert 0.0 <= r.data.metrics["test/acc"] <= 1.0
        assert r.data.params["data.source"] == "digits"
        assert r.data.params["seed"] == "0"
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 1  # one per epoch
        assert "hydra.overrides" in r.data.params
        assert {"transferlab.config_hash", "transferlab.timm", "transferlab.git_dirty"} <= set(r.data.tags)
        assert r.data.metrics["data/train_size"] == 50  # 5 per class x 10 digits, logged per split
        assert {"lr/stem", "lr/head", "trainable_params"} <= set(r.data.metrics)
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "stages.md", "hydra", "model"} <= names
    # Probing trains only the head: far fewer trainable parameters and FLOPs than fine-tuning.
    full, probe = by_depth["0"].data.metrics, by_depth["all"].data.metrics
    assert probe["compute/trainable_params"] < full["compute/trainable_params"]
    assert probe["compute/train_flops_per_sample"] < 0.5 * full["compute/train_flops_per_sample"]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert report >= {"report/report.md", "report/accuracy_vs_compute.png"}
    # What the runs table shows: short complete names (the swept key included), accuracy in %, GFLOPs.
    assert {r.info.run_name for r in jobs} == {
        "digits-5/class-fine_tune-freeze_depth=0-s0",
        "digits-5/class-fine_tune-freeze_depth=all-s0",
    }
    for r in jobs:
        assert r.data.metrics["test/acc_pct"] == pytest.approx(100 * r.data.metrics["test/acc"])
        assert r.data.metrics["compute/train_gflops"] == pytest.approx(r.data.metrics["compute/train_flops"] / 1e9)
    assert "| digits / 50 train |" in parent.data.tags["mlflow.note.content"]  # results table as description
    exp = client.get_experiment_by_name("e2e")
    assert "mlflow.sharedViewState.transferlab" in exp.tags  # the runs view the printed links open
    # Rerunning the sweep (resume is the default) trains nothing new: both jobs are skipped.
    again = _cli("train", "-m", *FAST, "study=e2e", "finetune.freeze_depth=0,all", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep e2e: 0 finished, 0 failed, 2 skipped of 2" in again.stdout
    rerun = _runs(store, "e2e")
    assert sorted(r.info.run_id for r in rerun if r.data.tags["transferlab.role"] == "job") == sorted(
        r.info.run_id for r in jobs
    )
    assert not list((tmp_path / ".transferlab" / "jobs").glob("*/*.ckpt"))  # finished jobs leave no checkpoints


def test_a_failing_job_is_isolated_and_the_sweep_reports_it(store: str, tmp_path: Path) -> None:
    # optim.lr=1e30 passes every check before the sweep, then its loss turns NaN at the second
    # step: the middle job fails while training; the others run on. (Bad data fails before the
    # first job: tests/test_target.py.)
    lrs = "optim.lr=0.001,1e30,0.002"
    result = _cli("train", "-m", *FAST, "data.batch_size=16", "study=broken", lrs, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    runs = _runs(store, "broken")
    status = {r.data.tags["transferlab.role"] + ":" + r.data.params.get("optim.lr", "-"): r.info.status for r in runs}
    assert status == {"sweep:-": "FAILED", "job:0.001": "FINISHED", "job:1e+30": "FAILED", "job:0.002": "FINISHED"}
    client = mlflow.MlflowClient(store)
    (failed,) = [r for r in runs if r.info.status == "FAILED" and r.data.tags["transferlab.role"] == "job"]
    reason = failed.data.tags["transferlab.failure"]
    assert reason.startswith("NonFiniteLoss: training loss is nan")
    assert "\n" not in reason
    trace = Path(client.download_artifacts(failed.info.run_id, "error/traceback.txt", str(tmp_path))).read_text()
    assert trace.startswith("Traceback")
    assert "NonFiniteLoss" in trace
    (parent,) = [r for r in runs if r.data.tags["transferlab.role"] == "sweep"]
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("sweep/")} == {
        "sweep/finished": 2,
        "sweep/failed": 1,
        "sweep/skipped": 0,
        "sweep/paused": 0,  # halving rungs only
        "sweep/pruned": 0,
    }
    best = [k for k in parent.data.metrics if k.startswith("best/digits-50/")]  # the parent's row shows results
    assert sorted(best) == ["best/digits-50/test_acc_pct", "best/digits-50/val_acc_pct"]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("[job ") for line in lines) == 3
    assert any(line.startswith("[job 3/3] FINISHED optim.lr=0.002 | test/acc=") for line in lines), lines
    (summary,) = [line for line in lines if line.startswith("sweep broken:")]
    assert summary.startswith("sweep broken: 2 finished, 1 failed, 0 skipped of 3")
    assert "failed: optim.lr=1e+30 (NonFiniteLoss" in summary
    assert "workflowType=machine_learning" in result.stdout
    assert (
        f"sweep run (best per target, report): http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
        in result.stdout
    )


def test_a_killed_job_resumes_into_its_run_with_identical_metrics(store: str, tmp_path: Path) -> None:
    """SIGKILL in the second phase, relaunch: the same MLflow run continues from the last epoch
    checkpoint and ends with exactly the metrics of an uninterrupted run."""
    job = [*FAST, "data.samples_per_class=20", "finetune=head_then_all", "finetune.head_epochs=1"]
    job += ["trainer.max_epochs=6", "tracking.save_every_s=0"]  # a save every epoch: the kill waits for one
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "transferlab", "train", *job]
    killed = subprocess.Popen([*cmd, "study=killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".transferlab/jobs/*/phase1-last.ckpt")) and time.time() < deadline:
        assert killed.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (interrupted,) = _runs(store, "killed")
    assert interrupted.info.status == "RUNNING"  # SIGKILL leaves no chance to end the run
    resumed = _cli("train", *job, "study=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming MLflow run {interrupted.info.run_id}" in resumed.stdout
    straight = _cli("train", *job, "study=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (after,) = _runs(store, "killed")
    (baseline,) = _runs(store, "straight")
    assert after.info.run_id == interrupted.info.run_id
    assert after.info.status == "FINISHED"
    for key in ("test/acc", "test/loss", "test/f1", "compute/epochs", "compute/train_samples"):
        assert after.data.metrics[key] == baseline.data.metrics[key], key
    history = mlflow.MlflowClient(store).get_metric_history(after.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(6))  # every epoch logged, across both processes


def _two_seed_sweep(store: str, tmp_path: Path, study: str, *args: str) -> tuple[subprocess.CompletedProcess, list]:
    """`train -m` over seed=0,1 with `args` (a launcher): both jobs FINISHED, each logged once under
    the sweep's parent run, and the summary line says so. -> (the process, the job runs)."""
    result = _cli("train", "-m", *FAST, f"study={study}", "seed=0,1", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(store, study)
    (parent,) = [r for r in runs if r.data.tags["transferlab.role"] == "sweep"]
    jobs = [r for r in runs if r.data.tags["transferlab.role"] == "job"]
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1"]  # one run per job
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert parent.data.metrics["sweep/finished"] == 2
    assert f"sweep {study}: 2 finished, 0 failed, 0 skipped of 2" in result.stdout
    return result, jobs


def test_joblib_sweep_with_two_workers_logs_every_metric(store: str, tmp_path: Path) -> None:
    """Two jobs at once in two worker processes (Hydra's joblib launcher) into one store."""
    _, jobs = _two_seed_sweep(store, tmp_path, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    client = mlflow.MlflowClient(store)
    expected = {"test/acc", "test/loss", "train/loss", "val/acc", "compute/train_flops", "data/train_size", "lr/head"}
    for r in jobs:
        assert expected <= set(r.data.metrics), expected - set(r.data.metrics)
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 1


def test_submitit_local_launcher_end_to_end(store: str, tmp_path: Path) -> None:
    """Each job in its own process started by submitit (what `submitit_slurm` does on a cluster)."""
    _two_seed_sweep(store, tmp_path, "submitit", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")


@pytest.mark.slow
def test_ray_launcher_runs_jobs_on_a_local_ray_cluster(store: str, tmp_path: Path) -> None:
    """hydra/launcher=ray with a local Ray instance (the README's Ray command without an address):
    each job a Ray task, every run logged under one parent."""
    result, _ = _two_seed_sweep(store, tmp_path, "ray", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2")
    # Hydra's own "Ray Launcher is launching" INFO line is hidden unless verbose (console.py): the
    # jobs' lines show they ran as Ray tasks (Ray prefixes a task's output with its worker).
    job_lines = [line for line in result.stdout.splitlines() if "[job " in line and "FINISHED" in line]
    assert len(job_lines) == 2
    assert all("_run_job pid=" in line for line in job_lines)


@pytest.mark.slow
def test_two_jobs_of_two_ddp_ranks_each_through_submitit(store: str, tmp_path: Path) -> None:
    """`-m` with multi-process DDP per job (hydra/launcher=local_ddp): submitit starts each job's
    two ranks, which form one DDP group per job and leave exactly one MLflow run per job."""
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "finetune=head_then_all", "finetune.head_epochs=1"]
    launcher = ["hydra/launcher=local_ddp", "hydra.launcher.timeout_min=10"]
    _, jobs = _two_seed_sweep(store, tmp_path, "ddp_sweep", "trainer.max_epochs=2", *ddp, *launcher)
    client = mlflow.MlflowClient(store)
    for job in jobs:
        # two ranks split the data (each image once per epoch) and stay in sync after the unfreeze
        assert job.data.metrics["compute/train_samples"] == 2 * job.data.metrics["data/train_size"]
        divergence = client.get_metric_history(job.info.run_id, "ddp/param_divergence")
        assert [m.value for m in divergence] == [0.0, 0.0]


def test_bad_overrides_fail_before_training_with_one_line(tmp_path: Path) -> None:
    for args in (
        ["backbone=nope"],
        ["backbone.name=resnet99"],
        ["-m", "backbone.name=test_resnet,resnet99"],
        ["finetune.freeze_depth=-2"],
        ["-m", "finetune.truncate_after=stage2,stage9"],  # checked against the real backbone
    ):
        result = _cli("train", *FAST, *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("transferlab train: error:"), lines
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_reproduce_gives_identical_metrics(store: str) -> None:
    cfg = compose_config([*FAST, "study=repro", "finetune=head_then_all", "trainer.max_epochs=3"])
    first = run(cfg)
    (logged,) = _runs(store, "repro")
    again = reproduce(logged.info.run_id)
    assert again.new["test/acc"] == first["test/acc"]
    assert again.new["test/loss"] == first["test/loss"]
    new = mlflow.MlflowClient(store).get_run(again.new_run_id)
    assert new.data.tags["reproduced_from"] == logged.info.run_id
    assert new.info.run_name == f"{logged.info.run_name}-repro"
    assert logged.info.run_id in again.table  # full ids, not 8 characters
    assert again.new_run_id in again.table
    assert "test/acc" in again.table
    # head_then_all: 2 head-only epochs, then every stage unfreezes at epoch 2.
    assert logged.data.metrics["unfrozen_at/stem"] == 2
    assert (
        logged.data.metrics["compute/head_flops_per_sample"] < logged.data.metrics["compute/finetune_flops_per_sample"]
    )


def test_reproduce_refuses_foreign_targets() -> None:
    check_targets({"optim": {"_target_": "torch.optim.AdamW"}})
    with pytest.raises(ConfigError, match="os.system"):
        check_targets({"callbacks": [{"_target_": "os.system", "command": "rm -rf /"}]})


def test_source_model_is_trained_once_and_reused(store: str, tmp_path: Path) -> None:
    source = "['data.samples_per_class=5','trainer.max_epochs=1','trainer.min_steps=0','data.augment=none']"
    overrides = [*FAST, "study=transfer", "backbone.weights=source", f"backbone.source_overrides={source}"]
    run(compose_config([*overrides, "seed=0"]))
    run(compose_config([*overrides, "seed=1"]))
    (pretrain,) = _runs(store, "sources")
    assert pretrain.data.tags["transferlab.role"] == "pretrain"
    targets = _runs(store, "transfer")
    assert len(targets) == 2
    assert {r.data.tags["transferlab.source_run_id"] for r in targets} == {pretrain.info.run_id}
    assert list((tmp_path / ".transferlab" / "sources").glob("*/backbone.safetensors"))
    # The same weights straight from the MLflow run, as a user on another machine would.
    from_run = f"runs:/{pretrain.info.run_id}/model/backbone.safetensors"
    run(compose_config([*FAST, "study=from_run", f"backbone.weights={from_run}"]))
    (target,) = _runs(store, "from_run")
    assert target.data.tags["transferlab.source_run_id"] == pretrain.info.run_id


def test_ddp_two_cpu_ranks_log_one_run_and_stay_in_sync(store: str, tmp_path: Path) -> None:
    """Freeze-then-unfreeze under DDP (gloo): one MLflow run, replicas equal after the unfreeze."""
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [
        *FAST,
        "study=ddp",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "finetune=head_then_all",
        "finetune.head_epochs=1",
        "trainer.max_epochs=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "-m", "transferlab", "train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (only,) = _runs(store, "ddp")
    assert only.info.status == "FINISHED"
    history = mlflow.MlflowClient(store).get_metric_history(only.info.run_id, "ddp/param_divergence")
    assert [m.value for m in history] == [0.0, 0.0]  # after the head phase and after the unfreeze
    # Ranks split the data: together they see each training image once per epoch, not twice.
    assert only.data.metrics["compute/train_samples"] == 2 * only.data.metrics["data/train_size"]


# Studies whose jobs start other jobs: keep those from random init too (no source pretraining).
SMOKE_EXTRA = {"distill": ["finetune.teacher.overrides=['backbone.weights=scratch','finetune=fine_tune']"]}


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (Path(__file__).parents[1] / "experiments").glob("*.yaml"))
)
def test_every_experiment_runs(experiment: str, store: str) -> None:
    """Smoke: each named study composes, validates and trains one batch."""
    cfg = compose_config(
        [
            f"experiment={experiment}",
            "backbone.weights=scratch",
            "trainer.fast_dev_run=true",
            "data.samples_per_class=3",
            "study=smoke",
            *SMOKE_EXTRA.get(experiment, []),
        ]
    )
    metrics = run(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_training_split_with_a_last_batch_of_one_image_trains(store: str) -> None:
    # 10 digits x 5 = 50 training images at batch 7: 7 full batches and one image left over,
    # which made BatchNorm raise "Expected more than 1 value per channel" in train mode.
    metrics = run(compose_config([*FAST, "data.batch_size=7", "study=one-image"]))
    assert metrics["data/train_size"] == 50
    assert metrics["compute/train_samples"] == 50  # the last image trained, folded into batch 7


def test_compute_totals_cover_every_phase_and_evaluation(store: str) -> None:
    overrides = ["trainer.max_epochs=3", "finetune=head_then_all", "finetune.head_epochs=1"]
    cfg = compose_config([*FAST, *overrides, "finetune.cache_features=off"])  # every pass on images
    m = run(cfg)
    client = mlflow.MlflowClient(store)
    (job,) = client.search_runs([client.get_experiment_by_name("adhoc").experiment_id])
    logged = job.data.metrics
    head, tune = logged["compute/head_flops_per_sample"], logged["compute/finetune_flops_per_sample"]
    n_head, n_tune = logged["compute/head_samples"], logged["compute/finetune_samples"]
    assert head < tune
    assert (n_head, n_tune) == (50, 100)  # 1 + 2 epochs of 50 images
    assert m["compute/train_flops"] == pytest.approx(head * n_head + tune * n_tune)
    assert m["compute/train_flops_per_sample"] == pytest.approx((head * n_head + tune * n_tune) / 150)
    assert m["compute/train_flops_per_sample"] < tune  # not the last phase's value
    evaluated = 3 * m["data/val_size"] + m["data/test_size"]  # validation after each of 3 epochs, one test
    assert m["compute/eval_flops"] == pytest.approx(m["compute/inference_flops_per_sample"] * evaluated)
