"""An unwritable or full artifact location: one line, the run FAILED, no half-written cache entry."""

from __future__ import annotations

import errno
from pathlib import Path

import mlflow
import pytest

from conftest import FAST
from test_lineage import JOB
from transferlab.cli import main
from transferlab.config import compose_config
from transferlab.errors import TransferlabError
from transferlab.jobs.run import run
from transferlab.jobs.upstream import ensure_source


def _statuses(uri: str, experiment: str) -> list[str]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [r.info.status for r in client.search_runs([exp.experiment_id])] if exp else []


def test_unwritable_artifact_root_fails_in_one_line_before_any_run(store, tmp_path, capfd) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be (works even as root)")
    code = main(["train", *FAST, "study=unwritable", f"tracking.artifact_root={blocker / 'artifacts'}"])
    assert code == 2  # refused before Hydra starts a job: no run at all
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert "is not writable" in errors[0]
    assert "tracking.artifact_root" in errors[0]
    assert "Traceback" not in err
    assert "FINISHED" not in _statuses(store, "unwritable")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_disk_full_mid_run_marks_the_run_failed(store, monkeypatch) -> None:
    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", _disk_full)  # the weights, at the end
    with pytest.raises(TransferlabError, match="No space left on device") as err:
        run(compose_config([*FAST, "study=full"]))
    assert "\n" not in str(err.value)
    assert _statuses(store, "full") == ["FAILED"]


@pytest.mark.slow
def test_disk_full_while_caching_a_source_leaves_no_entry(store, tmp_path, monkeypatch) -> None:
    cfg = compose_config(JOB)
    with monkeypatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, "log_artifact", _disk_full)
        with pytest.raises(TransferlabError, match="No space left on device"):
            ensure_source(cfg, train=run)
    sources = tmp_path / ".transferlab" / "sources"
    assert [p.name for p in sources.iterdir() if not p.name.endswith(".lock")] == []  # no entry, no temp folder
    assert _statuses(store, "sources") == ["FAILED"]
    weights, _ = ensure_source(cfg, train=run)  # a later run builds it whole
    assert weights.is_file()
    assert sorted(_statuses(store, "sources")) == ["FAILED", "FINISHED"]
    assert Path(weights).stat().st_size > 0
