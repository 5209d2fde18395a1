"""A tracking store lost mid-run: training goes on, writes are buffered and retried, nothing is faked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from conftest import FAST
from transferlab.config import compose_config
from transferlab.errors import TransferlabError
from transferlab.jobs.run import run
from transferlab.tracking.buffer import BufferedClient, StoreLostError
from transferlab.tracking.run import EpochLogger


class FlakyClient:
    """Records calls; raises like MLflow does against a dead server while `down`."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple] = []

    def __getattr__(self, method: str):
        def call(*args, **kwargs):
            if self.down:
                raise MlflowException("API request to http://127.0.0.1:1 failed with exception ConnectionError")
            self.calls.append((method, args, kwargs))

        return call


def _metric(key: str, step: int) -> Metric:
    return Metric(key, float(step), 0, step)


def test_writes_are_buffered_in_order_and_flushed_when_the_store_is_back(tmp_path) -> None:
    client = FlakyClient()
    writer = BufferedClient(client, "r1", tmp_path / "spool", retry_seconds=5, pause_s=0)
    client.down = True
    writer.log_batch(metrics=[_metric("train/loss", 0)])
    scratch = tmp_path / "model.bin"
    scratch.write_bytes(b"weights")
    writer.log_artifact(scratch, "model")
    scratch.unlink()  # a temporary file may be gone by the time the store is back
    writer.log_batch(metrics=[_metric("train/loss", 1)])
    assert client.calls == []
    assert len(writer.pending) == 3
    client.down = False
    writer.pending.append(("set_terminated", ("r1", "FINISHED"), {}))
    writer.drain()
    assert [c[0] for c in client.calls] == ["log_batch", "log_artifact", "log_batch", "set_terminated"]
    assert [c[2]["metrics"][0].step for c in client.calls if c[0] == "log_batch"] == [0, 1]
    assert Path(client.calls[1][1][1]).read_bytes() == b"weights"


def test_deferred_writes_merge_into_one_and_go_with_the_next_write(tmp_path) -> None:
    client = FlakyClient()
    writer = BufferedClient(client, "r1", tmp_path / "spool", retry_seconds=5, pause_s=0, defer_s=3600)
    writer.log_batch(tags=[RunTag("a", "1")], defer=True)
    writer.log_batch(metrics=[_metric("train/loss", 0)], defer=True)
    writer.log_batch(metrics=[_metric("train/loss", 1)], tags=[RunTag("b", "2")], defer=True)
    writer.log_batch(tags=[RunTag("a", "3")], defer=True)  # a tag set twice: its own write, in order
    assert client.calls == []
    writer.log_batch(metrics=[_metric("test/acc", 1)])  # not deferred: sends what waits, then itself
    assert [(len(c[2]["metrics"]), [t.key for t in c[2]["tags"]]) for c in client.calls] == [
        (2, ["a", "b"]),
        (1, ["a"]),
    ]
    writer.log_batch(metrics=[_metric("train/loss", 2)], defer=True)
    writer.log_text("x", "notes.txt")  # any write sends the deferred ones first
    assert [c[0] for c in client.calls[2:]] == ["log_batch", "log_text"]
    writer.log_batch(params=[mlflow.entities.Param("p", "1")], defer=True)
    writer.log_batch(params=[mlflow.entities.Param("q", "1")], defer=True)  # params never merge
    writer.flush()
    assert [c[2]["params"][0].key for c in client.calls[4:]] == ["p", "q"]


def test_a_deferred_write_waits_at_most_defer_s(tmp_path) -> None:
    client = FlakyClient()
    writer = BufferedClient(client, "r1", tmp_path / "spool", retry_seconds=5, pause_s=0, defer_s=0.05)
    writer.log_batch(metrics=[_metric("train/loss", 0)], defer=True)
    assert client.calls == []
    time.sleep(0.06)
    writer.log_batch(metrics=[_metric("train/loss", 1)], defer=True)
    assert [len(c[2]["metrics"]) for c in client.calls] == [2]


def test_a_store_that_never_returns_fails_loudly_with_a_local_copy(tmp_path) -> None:
    client = FlakyClient()
    writer = BufferedClient(client, "r1", tmp_path / "spool", retry_seconds=0.2, pause_s=0.05)
    writer.log_batch(params=[mlflow.entities.Param("optim.lr", "0.01")])
    writer.log_text("seed: 0\n", "config.yaml")
    client.down = True
    writer.log_batch(metrics=[_metric("test/acc", 3)])
    writer.pending.append(("set_terminated", ("r1", "FINISHED"), {}))
    with pytest.raises(StoreLostError) as err:
        writer.drain()
    assert str(tmp_path / "spool") in str(err.value)
    assert not [c for c in client.calls if c[0] == "set_terminated"]  # never FINISHED
    saved = tmp_path / "spool"
    assert json.loads((saved / "metrics.json").read_text())["test/acc"] == [{"step": 3, "value": 3.0}]
    assert json.loads((saved / "params.json").read_text()) == {"optim.lr": "0.01"}
    assert (saved / "config.yaml").read_text() == "seed: 0\n"


def test_a_local_disk_error_is_not_retried(tmp_path) -> None:
    class FullDisk(FlakyClient):
        def __getattr__(self, method: str):
            def call(*args, **kwargs):
                raise OSError(28, "No space left on device")

            return call

    writer = BufferedClient(FullDisk(), "r1", tmp_path / "spool", retry_seconds=60)
    with pytest.raises(TransferlabError, match="No space left on device"):
        writer.log_text("x", "config.yaml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    cmd += ["--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    log = (tmp_path / "server.log").open("ab")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)


def _wait_up(port: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (its workers too)
    server.wait(timeout=60)


@pytest.mark.slow
def test_job_survives_a_server_that_stops_and_comes_back(tmp_path, monkeypatch, native_cpu_kernels) -> None:
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    servers = [_start_server(tmp_path, port)]
    try:
        _wait_up(port)
        uri = f"http://127.0.0.1:{port}"
        real_epoch_end = EpochLogger.on_train_epoch_end

        def lose_store_once(self, trainer, module):
            if len(servers) == 1:
                _stop(servers[0])
                servers.append(_start_server(tmp_path, port))  # back some seconds later
            real_epoch_end(self, trainer, module)

        monkeypatch.setattr(EpochLogger, "on_train_epoch_end", lose_store_once)
        cfg = compose_config([*FAST, "study=lost", "trainer.max_epochs=2", f"tracking.uri={uri}"])
        cfg.tracking.retry_seconds = 120
        metrics = run(cfg)
        assert len(servers) == 2
        _wait_up(port)
        client = mlflow.MlflowClient(uri)
        (logged,) = client.search_runs([client.get_experiment_by_name("lost").experiment_id])
        assert logged.info.status == "FINISHED"
        assert logged.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
        history = client.get_metric_history(logged.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [0, 1]  # epoch 0 was logged while the store was down
        assert {a.path for a in client.list_artifacts(logged.info.run_id, "model")} == {"model/model.safetensors"}

        # Now it stays down: the job ends FAILED-loudly with its results saved locally.
        monkeypatch.setattr(
            EpochLogger, "on_train_epoch_end", lambda self, t, m: (_stop(servers[-1]), real_epoch_end(self, t, m))
        )
        cfg = compose_config([*FAST, "study=lost", "seed=1", f"tracking.uri={uri}"])
        cfg.tracking.retry_seconds = 1
        with pytest.raises(StoreLostError) as err:
            run(cfg)
        saved = Path(str(err.value).rsplit(" ", 1)[-1])
        assert saved.is_dir()
        assert "test/acc" in json.loads((saved / "metrics.json").read_text())
        assert "seed: 1" in (saved / "config.yaml").read_text()
        # Read the server's database directly: the run is not FINISHED.
        direct = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
        statuses = {r.data.tags.get("transferlab.seed"): r.info.status for r in direct.search_runs(["1"])}
        assert statuses == {"0": "FINISHED", "1": "RUNNING"}
    finally:
        for server in servers:
            if server.poll() is None:
                _stop(server)
