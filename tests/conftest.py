"""Shared fixtures: a migrated MLflow store made once per session and copied per test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A job small enough for end-to-end tests: 5 digits per class, 1 epoch, random init.
FAST = [
    "backbone.weights=scratch",
    "data=digits",
    "data.samples_per_class=5",
    "data.augment=none",
    "trainer.max_epochs=1",
    "trainer.min_steps=0",
    "trainer.accelerator=cpu",
]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Creating and migrating a SQLite store takes seconds; copying one takes milliseconds."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh tracking store in tmp_path (also the working directory)."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def native_cpu_kernels():
    """oneDNN builds new conv primitives for every freeze pattern (seconds each at batch 2);
    the native kernels are faster for these tiny shapes."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@pytest.fixture(scope="module")
def cfg():
    """A composed config with random init; tests copy and override it."""
    from transferlab.config import compose_config

    return compose_config(["backbone.weights=scratch"])


@pytest.fixture(autouse=True)
def _no_hydra_run_left_behind():
    """An in-process CLI call leaves Hydra's global run config set; the next test must not see it."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
