"""Source models: one build for concurrent users, rebuilt when damaged, lineage that resolves in
whichever store a job logs to, and reproducible after the cache is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file

from conftest import FAST
from transferlab.cache import ensure
from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.jobs.reproduce import reproduce, source_weights
from transferlab.jobs.run import run
from transferlab.jobs.upstream import WEIGHTS, ensure_source, source_entry

TINY_SOURCE = (
    "backbone.source_overrides=['data.samples_per_class=5','trainer.max_epochs=1','trainer.min_steps=0',"
    "'data.augment=none']"
)
JOB = [*FAST, "study=transfer", "backbone.weights=source", TINY_SOURCE]


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


class NoRuns:
    tracking_uri = "sqlite:///elsewhere.db"

    def get_run(self, run_id: str):
        raise MlflowException(f"Run with id={run_id} not found")


def test_reproduce_falls_back_to_the_cached_source_by_config_hash(tmp_path, cfg) -> None:
    cfg = cfg.copy()
    cfg.cache_dir = str(tmp_path)
    tags = {"transferlab.source_run_id": "gone", "transferlab.source_config_hash": "abc123"}
    with pytest.raises(ConfigError, match="neither in sqlite:///elsewhere.db nor in the cache"):
        source_weights(NoRuns(), cfg, tags)
    folder = source_entry(cfg, "abc123")
    ensure(tmp_path, "sources", folder.name, lambda tmp: (tmp / WEIGHTS).write_bytes(b"w") and None)
    assert source_weights(NoRuns(), cfg, tags) == str(folder / WEIGHTS)


@pytest.mark.slow
def test_truncated_source_model_is_retrained_not_loaded(store: str) -> None:
    cfg = compose_config(JOB)
    weights, tags = ensure_source(cfg, train=run)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # as after a crash or a full disk
    again, new_tags = ensure_source(cfg, train=run)
    assert again == weights
    load_file(str(again))  # a whole safetensors file again
    assert len(_runs(store, "sources")) == 2
    assert new_tags["transferlab.source_run_id"] != tags["transferlab.source_run_id"]


@pytest.mark.slow
def test_two_processes_needing_one_source_train_it_once(store: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "transferlab", "pretrain", *JOB]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("training source model") for out in outs) == 1  # the other one waited
    paths = {line for out in outs for line in out.splitlines() if line.startswith("source model:")}
    assert len(paths) == 1
    (trained,) = _runs(store, "sources")
    assert trained.info.status == "FINISHED"


@pytest.mark.slow
def test_lineage_resolves_in_a_new_store_and_after_the_cache_is_gone(
    tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uris = {}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        shutil.copy(mlflow_template, tmp_path / name / "mlflow.db")
        uris[name] = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris["first"])
    run(compose_config(JOB))  # trains the source, logged in the first store
    (original,) = _runs(uris["first"], "sources")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris["second"])
    metrics = run(compose_config(JOB))  # the shared cache hits; the second store never saw the source
    (job,) = _runs(uris["second"], "transfer")
    (registered,) = _runs(uris["second"], "sources")
    assert job.data.tags["transferlab.source_run_id"] == registered.info.run_id
    assert original.info.run_id in registered.data.tags["transferlab.registered_from"]
    assert registered.info.status == "FINISHED"
    assert registered.data.metrics["test/acc"] == original.data.metrics["test/acc"]

    again = reproduce(job.info.run_id, uris["second"])
    assert again.new["test/acc"] == metrics["test/acc"]
    shutil.rmtree(tmp_path / ".transferlab" / "sources")  # the store still holds the source
    after = reproduce(job.info.run_id, uris["second"])
    assert after.new["test/acc"] == metrics["test/acc"]
    assert not (tmp_path / ".transferlab" / "sources").exists()  # not retrained from today's recipe
