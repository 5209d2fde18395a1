"""Unreachable tracking store and model hub: found by one short probe, reported in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from conftest import FAST
from transferlab import preflight as probes
from transferlab.cli import main
from transferlab.errors import ConfigError
from transferlab.transfer.backbone import create_backbone

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "_reachable", set())
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def _count_probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = probes._get

    def counting(url: str, timeout: float) -> None:
        seen.append(url)
        real(url, timeout)

    monkeypatch.setattr(probes, "_get", counting)
    return seen


def test_dead_store_fails_a_sweep_once_before_any_data(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    seen = _count_probes(monkeypatch)

    def no_data(*args, **kwargs):
        raise AssertionError("data was built although the store is unreachable")

    monkeypatch.setattr("transferlab.jobs.fit.build_datamodule", no_data)
    assert main(["train", "-m", *FAST, "seed=0,1,2", f"tracking.uri={DEAD}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert DEAD in err
    assert "sqlite:///" in err  # the fix
    assert seen == [f"{DEAD}/health"]  # one probe for the three jobs
    assert not list(tmp_path.rglob("*.db"))


def test_store_probe_disables_mlflow_http_retries() -> None:
    """MLflow's own retries (minutes against a dead server) are off; the tracker retries itself."""
    with pytest.raises(ConfigError, match="unreachable"):
        probes.check_store(DEAD)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30


def test_user_retry_settings_are_kept(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    probes.limit_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_a_probe_that_hangs_is_cut_off() -> None:
    """DNS lookups ignore socket timeouts: the probe's thread is abandoned after its limit."""
    err = probes._error_within(lambda: time.sleep(30), 0.2)
    assert isinstance(err, TimeoutError)
    assert probes._error_within(lambda: None, 5) is None


def test_sqlite_store_in_a_missing_folder(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        probes.check_store(f"sqlite:///{tmp_path}/nope/mlflow.db")
    probes.check_store(f"sqlite:///{tmp_path}/mlflow.db")


def test_unreachable_hub_switches_offline_and_names_the_fix(monkeypatch, cfg) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", DEAD)
    seen = _count_probes(monkeypatch)
    backbone = cfg.backbone.copy()
    backbone.weights = "pretrained"
    with pytest.raises(ConfigError) as err:
        create_backbone(backbone)
    message = str(err.value)
    assert "\n" not in message
    assert "offline" in message
    assert "backbone.weights=source" in message
    assert "/path/to/weights.safetensors" in message
    assert seen == [DEAD]
    assert probes.hub_offline()  # huggingface_hub now refuses at once instead of retrying
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # and so do the sweep's child processes


def test_offline_setting_is_honoured_without_a_probe(monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = _count_probes(monkeypatch)
    assert probes.ensure_hub_or_offline() is False
    assert seen == []


@pytest.mark.slow
def test_cli_with_dead_store_prints_one_line_and_writes_nothing(tmp_path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": DEAD, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    done = subprocess.run(
        [sys.executable, "-m", "transferlab", "train", *FAST],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("transferlab train: error: tracking store http://127.0.0.1:9 is unreachable")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
