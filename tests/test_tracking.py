from __future__ import annotations

import mlflow
import pytest
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from conftest import FAST
from transferlab.config import compose_config
from transferlab.tracking.identity import condition_hash, config_hash, flatten
from transferlab.tracking.run import RunTracker, experiment_id, tracking_uri


@pytest.fixture(scope="module")
def cfg():
    return compose_config(FAST)


def test_flatten_covers_every_leaf(cfg) -> None:
    flat = flatten(cfg)
    assert flat["backbone.name"] == "test_resnet"
    assert flat["finetune.head.hidden"] == "[]"
    assert flat["data.classes"] == "None"
    leaves = OmegaConf.to_container(cfg, resolve=True)
    assert len(flat) == sum(1 for _ in _leaves(leaves))


def _leaves(node):
    if isinstance(node, dict) and node:
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


def test_hashes_are_stable_and_scoped(cfg) -> None:
    other_seed = compose_config([*FAST, "seed=1"])
    other_store = compose_config([*FAST, "tracking.uri=sqlite:///elsewhere.db"])
    assert config_hash(cfg) == config_hash(compose_config(FAST))
    assert config_hash(cfg) != config_hash(other_seed)
    assert condition_hash(cfg) == condition_hash(other_seed)  # seeds pool into one condition
    assert config_hash(cfg) == config_hash(other_store)  # where it is logged is not what it computes
    assert condition_hash(cfg) != condition_hash(compose_config([*FAST, "finetune=probe"]))


def test_tracking_uri_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(OmegaConf.create({"uri": None})) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(OmegaConf.create({"uri": None})) == "sqlite:///env.db"
    assert tracking_uri(OmegaConf.create({"uri": "sqlite:///cfg.db"})) == "sqlite:///cfg.db"


def test_only_rank_zero_creates_runs(store, cfg, monkeypatch) -> None:
    tracking = OmegaConf.merge(cfg.tracking, {"experiment": "ranks"})
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    other = RunTracker(tracking)
    other.start("job", {})
    other.log_metrics({"a": 1.0})
    other.end()
    assert other.run_id is None
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    zero = RunTracker(tracking)
    zero.start("job", {"transferlab.role": "job"})
    zero.log_params({"p": "x" * 7000})  # long values are cut to MLflow's limit, not rejected
    zero.end()
    client, exp = experiment_id(tracking)
    (only,) = client.search_runs([exp])
    assert only.info.status == "FINISHED"
    assert len(only.data.params["p"]) == 6000


def test_failed_run_is_marked_failed(store, monkeypatch) -> None:
    from transferlab.jobs import run as train

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train, "fit_and_test", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        train.run(compose_config([*FAST, "study=fails"]))
    client = mlflow.MlflowClient(store)
    (failed,) = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert failed.info.status == "FAILED"


def test_resume_skips_a_job_that_already_finished(store) -> None:
    from transferlab.jobs.run import run

    cfg = compose_config([*FAST, "study=resume", "tracking.resume=true"])
    first = run(cfg)
    again = run(cfg)
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1  # nothing retrained
    assert again["test/acc"] == first["test/acc"]
    run(compose_config([*FAST, "study=resume", "tracking.resume=true", "seed=1"]))
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 2


def test_training_semantics_version_is_part_of_every_hash(cfg, monkeypatch) -> None:
    from transferlab.jobs.upstream import source_config
    from transferlab.tracking import identity

    source_cfg = compose_config([*FAST, "backbone=resnet18", "backbone.weights=source"])
    now = (config_hash(cfg), condition_hash(cfg), config_hash(source_config(source_cfg)))
    monkeypatch.setattr(identity, "TRAINING_SEMANTICS", identity.TRAINING_SEMANTICS - 1)
    older = (config_hash(cfg), condition_hash(cfg), config_hash(source_config(source_cfg)))
    assert all(a != b for a, b in zip(now, older, strict=True))  # resume, report pooling, source cache


def test_resume_never_returns_a_run_made_by_older_training_code(store, monkeypatch) -> None:
    from transferlab.jobs.run import run
    from transferlab.tracking import identity

    cfg = compose_config([*FAST, "study=semantics", "tracking.resume=true"])
    with monkeypatch.context() as patch:
        patch.setattr(identity, "TRAINING_SEMANTICS", identity.TRAINING_SEMANTICS - 1)
        run(cfg)
    run(cfg)
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("semantics").experiment_id])
    assert len(runs) == 2  # the old-code result was not handed back
    now = identity.TRAINING_SEMANTICS
    assert {r.data.tags["transferlab.training_semantics"] for r in runs} == {str(now - 1), str(now)}
