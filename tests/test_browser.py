"""The MLflow UI as a person sees it: a finished sweep, served by `transferlab ui`, rendered by
headless Chromium. Screenshots land in test-artifacts/browser/ (or $TRANSFERLAB_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST

pytestmark = pytest.mark.slow
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
SHOTS = Path(os.environ.get("TRANSFERLAB_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _browser() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    found = [p for p in CHROMIUM if Path(p).exists()] or [shutil.which("chromium") or ""]
    if not found[0]:
        pytest.skip("no Chromium binary: apt-get install -y --no-install-recommends chromium")
    return found[0]


def _parent(folder: Path) -> tuple[str, str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("browse")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`transferlab.role` = 'sweep'")
    return exp.experiment_id, parent.info.run_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_sweep(study: str) -> None:
    """A finished sweep logged through the real tracking code (RunTracker, run names, report), with
    made-up metrics instead of training: the UI is under test here, not the training
    (tests/test_e2e.py checks that a real multirun logs the same fields)."""
    from transferlab.config import compose_config
    from transferlab.studies.report import write_report
    from transferlab.tracking.identity import condition_hash, flatten, job_run_name
    from transferlab.tracking.run import RunTracker, tracking_uri

    base = compose_config([*FAST, f"study={study}"])
    parent = RunTracker(base.tracking)
    parent.start(f"sweep-{study}", {"transferlab.role": "sweep"})
    for strategy, acc, flops in (("fine_tune", 0.90, 3e9), ("probe", 0.70, 1e9)):
        for seed in range(3):
            cfg = compose_config([*FAST, f"study={study}", f"finetune={strategy}", f"seed={seed}"])
            job = RunTracker(cfg.tracking)
            tags = {"transferlab.role": "job", "transferlab.condition_hash": condition_hash(cfg)}
            job.start(job_run_name(cfg), tags, parent.run_id)
            job.log_params(flatten(cfg))
            metrics = {"test/acc": acc + seed / 100, "compute/train_flops": flops, "data/train_size": 50}
            metrics |= {"compute/train_gflops": flops / 1e9, "compute/train_flops_per_sample": flops / 50}
            job.log_metrics(metrics | {"test/acc_pct": 100 * metrics["test/acc"], "data/test_size": 270})
            job.end()
    write_report(study, Path("reports") / study, tracking_uri(base.tracking), parent.run_id)
    parent.end()


@pytest.fixture
def served_sweep(store: str, tmp_path: Path):
    """A finished sweep in ./mlflow.db, and `transferlab ui` serving it; yields the printed links."""
    _log_sweep("browse")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "transferlab"]
    env.pop("MLFLOW_TRACKING_URI")  # the UI finds ./mlflow.db itself, like `make ui`
    port = _free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [*cli, "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                time.sleep(1)
        else:
            pytest.fail(f"the UI never answered: {log.read_text()}")
        yield re.findall(r"http://\S+", log.read_text()), log
    finally:
        server.send_signal(signal.SIGINT)  # what Ctrl-C sends
        server.wait(timeout=60)
    terminal = log.read_text()
    assert "Traceback" not in terminal
    assert "POST /ajax-api" not in terminal  # no per-request access log


def test_runs_view_shows_the_sweep_its_runs_and_key_columns(served_sweep) -> None:
    from playwright.sync_api import sync_playwright

    from transferlab.tracking.links import ui_url

    links, log = served_sweep
    runs_link = next(link for link in links if "workflowType=machine_learning" in link)
    folder = SHOTS / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {folder}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_browser(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(runs_link)
        page.get_by_text("sweep-browse").first.wait_for(timeout=60_000)
        close = page.get_by_role("button", name=re.compile("close", re.I))
        if close.count():  # MLflow 3's assistant panel takes a third of the page
            close.first.click()
        page.get_by_text("sweep-browse").first.wait_for()
        page.screenshot(path=folder / "1-runs-collapsed.png")
        body = page.inner_text("body")
        assert "browse" in body  # the study (MLflow experiment)
        assert "matching runs" in body  # the runs view, not the GenAI overview
        for column in ("finetune.strategy", "finetune.freeze_depth", "test/acc_pct", "compute/train_gflops"):
            assert column in body, f"column {column} is not shown by default"
        page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # expand the parent
        child = "digits-5/class-fine_tune-s0"
        page.get_by_text(child).first.wait_for(timeout=30_000)
        page.screenshot(path=folder / "2-runs-expanded.png")
        body = page.inner_text("body")
        assert "digits-5/class-probe-s2" in body
        assert "probe" in body  # strategy
        assert "all" in body  # freeze depth of a probe
        assert re.search(r"\b\d{1,3}\.\d+\b", body)  # accuracy in % and FLOPs as numbers
        exp_id, parent_id = _parent(log.parent)
        page.goto(ui_url(exp_id, parent_id, base=runs_link.split("/#")[0]))  # as printed at the end of a job
        page.get_by_text("Description").first.wait_for(timeout=30_000)
        show_more = page.get_by_text("Show more")
        if show_more.count():
            show_more.first.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=folder / "3-parent-run.png", full_page=True)
        body = page.inner_text("body")
        assert "test accuracy %" in body  # the results table as its description
        assert "Child runs" in body
        assert "Evaluation runs" not in body  # the model-training sidebar, not GenAI's
        page.goto(next(link for link in links if "compareRunsMode=CHART" in link))
        page.wait_for_timeout(5000)
        page.screenshot(path=folder / "4-accuracy-vs-gflops.png")
        page.get_by_text("Accuracy vs compute").first.wait_for(timeout=60_000)  # the scatter's section
        body = page.inner_text("body")
        assert "Group by" in body
        assert "finetune.strategy" in body  # the groups the scatter colours
        browser.close()
