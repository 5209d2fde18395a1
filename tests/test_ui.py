"""`transferlab ui` serves the local store: the MLflow server answers and lists the study."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from transferlab.tracking.ui_app import AUTO_OPENED

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_local_store(store: str, tmp_path) -> None:
    client = mlflow.MlflowClient(store)
    exp = client.create_experiment("browse-me", (tmp_path / "mlartifacts").as_uri())
    client.create_run(exp, run_name="a-run")
    port = _free_port()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI")  # the UI must find ./mlflow.db by itself, like `make ui`
    server = subprocess.Popen(
        [sys.executable, "-m", "transferlab", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
        body = None
        deadline = time.time() + 90
        while time.time() < deadline and body is None:
            try:
                request = urllib.request.Request(
                    url, data=b'{"max_results": 10}', headers={"Content-Type": "application/json"}
                )
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(1)
        assert body is not None, "the UI never answered"
        assert "browse-me" in {e["name"] for e in body["experiments"]}
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<html" in page.lower()
        assert f"localStorage.setItem('{AUTO_OPENED}','true')" in page  # MLflow's assistant stays closed at first
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
