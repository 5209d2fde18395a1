"""Stored runs and killed jobs from before the package was reorganised still work after it.

`fixtures/premove` was written by the code at commit de50d8b (the flat 38-module layout): one
finished job, and one `head_then_all` job killed as its second phase started (a KILLED run and
its phase state under `.transferlab/jobs/`). The script that made it is in its README.md.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import mlflow
import pytest

from transferlab.config import compose_config
from transferlab.jobs.reproduce import reproduce
from transferlab.jobs.run import run
from transferlab.tags import CONFIG_HASH
from transferlab.tracking.identity import config_hash

FIXTURE = Path(__file__).parent / "fixtures" / "premove"
MADE_AT = "file:///tmp/fx"  # where the fixture was written: its artifact URIs point there


@pytest.fixture
def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fixture copied into tmp_path (also the working directory), artifact URIs moved with it."""
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    db = sqlite3.connect(tmp_path / "mlflow.db")
    here = tmp_path.as_uri()
    db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (MADE_AT, here))
    db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (MADE_AT, here))
    db.commit()
    db.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _runs(uri: str, study: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(study).experiment_id])


def test_old_runs_keep_their_config_hash(old_store: str) -> None:
    (finished,) = _runs(old_store, "premove")
    made = json.loads((FIXTURE / "made_by.json").read_text())
    overrides = [o for o in made["killed_overrides"] if not o.startswith(("study=", "tracking.uri=", "finetune"))]
    overrides = [o for o in overrides if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1"]
    cfg = compose_config([*overrides, "study=premove", f"tracking.uri={old_store}"])
    assert finished.data.tags[CONFIG_HASH] == config_hash(cfg)  # resume and the caches find old results


def test_a_run_logged_before_the_move_reproduces_after_it(old_store: str) -> None:
    (finished,) = _runs(old_store, "premove")
    result = reproduce(finished.info.run_id, old_store)
    assert result.new["test/acc"] == pytest.approx(finished.data.metrics["test/acc"], abs=1e-9)
    assert result.new["test/loss"] == pytest.approx(finished.data.metrics["test/loss"], rel=1e-5)


@pytest.mark.slow
def test_a_job_killed_before_the_move_resumes_into_its_run_after_it(old_store: str) -> None:
    made = json.loads((FIXTURE / "made_by.json").read_text())
    (killed,) = _runs(old_store, "premove_killed")
    assert killed.info.status == "KILLED"
    cfg = compose_config([*made["killed_overrides"], f"tracking.uri={old_store}", "tracking.resume=true"])
    resumed = run(cfg)
    (after,) = _runs(old_store, "premove_killed")  # the same run, not a new one
    assert after.info.run_id == killed.info.run_id
    assert after.info.status == "FINISHED"
    fresh = run(compose_config([*made["killed_overrides"], "study=fresh", f"tracking.uri={old_store}"]))
    assert resumed["test/acc"] == pytest.approx(fresh["test/acc"], abs=1e-9)
    assert resumed["compute/train_flops"] == pytest.approx(fresh["compute/train_flops"])
