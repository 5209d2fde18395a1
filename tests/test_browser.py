"""The MLflow UI as a person sees it: a finished sweep, served by `transferlab ui`, rendered by
headless Chromium, each link in a fresh browser (as a first visit). Screenshots are taken under
tmp_path and copied to test-artifacts/browser/ (or $TRANSFERLAB_TEST_ARTIFACTS)."""

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


def _assistant_closed(page) -> bool:
    """MLflow 3.17 opens its assistant panel on a browser's first visit to a localhost UI; closed,
    the panel leaves its round button (bottom right) instead of the panel's close button."""
    from playwright.sync_api import TimeoutError as NoButton

    try:
        page.locator('button[data-assistant-ui="true"]').first.wait_for(timeout=20_000)
    except NoButton:
        return False
    return page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]').count() == 0


def _cells(page, column: str) -> list[str]:
    """One column's cell texts, top row first (ag-grid positions rows; DOM order may differ)."""
    cells = page.eval_on_selector_all(
        f'[role="gridcell"][col-id="{column}"]',
        "cells => cells.map(c => [Number(c.closest('[row-index]').getAttribute('row-index')), c.innerText.trim()])",
    )
    return [text for _, text in sorted(cells)]


def test_first_view_shows_results_and_a_readable_chart(served_sweep, tmp_path: Path) -> None:
    """The printed links, each in a browser that never saw MLflow: the job runs, flat and best
    first, with their metrics; the assistant panel closed; the sweep run's best per target;
    the accuracy-vs-GFLOPs chart across the section, without an "Unassigned" group."""
    from playwright.sync_api import sync_playwright

    links, _ = served_sweep
    runs_link = next(link for link in links if link.endswith("viewStateShareKey=transferlab"))
    chart_link = next(link for link in links if "compareRunsMode=CHART" in link)
    sweep_link = next(link for link in links if "/runs/" in link)
    shots = tmp_path / "browser"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_browser(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(runs_link)
        page.get_by_text("digits-5/class-fine_tune-s2").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # column widths settle
        page.screenshot(path=shots / "1-first-view.png")
        assert _assistant_closed(page), "the MLflow assistant panel is open on the first view"
        body = page.inner_text("body")
        assert "matching runs" in body  # the runs view, not the GenAI overview
        names = _cells(page, "attributes.`Run Name`")
        assert len(names) == 6, names  # every job run, none hidden under a collapsed parent
        assert "sweep-browse" not in names
        acc = [float(v) for v in _cells(page, "metrics.`test/acc_pct`")]  # a cell per run, none empty
        assert acc == sorted(acc, reverse=True) == [92, 91, 90, 72, 71, 70]  # best first
        assert _cells(page, "params.`finetune.strategy`")[:3] == ["fine_tune"] * 3
        assert set(_cells(page, "metrics.`compute/train_gflops`")) == {"3", "1"}
        for column in ("finetune.strategy", "finetune.freeze_depth", "data/train_size", "test/acc_pct"):
            assert column in body, f"column {column} is not shown by default"
        header = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]').bounding_box()
        assert header["width"] >= 250  # run names readable, not cut at 190 px

        page.goto(sweep_link)  # the sweep's parent run: its best per target and the report
        page.get_by_text("best/digits-50/test_acc_pct").first.wait_for(timeout=30_000)
        page.screenshot(path=shots / "2-sweep-run.png", full_page=True)
        body = page.inner_text("body")
        assert "test accuracy %" in body  # the results table as its description
        assert "Child runs" in body
        assert "Evaluation runs" not in body  # the model-training sidebar, not GenAI's

        page.goto(chart_link)
        page.get_by_text("Accuracy vs compute").first.wait_for(timeout=60_000)
        card = page.locator('[data-testid="experiment-view-compare-runs-card"]').first
        card.locator(".js-plotly-plot").wait_for(timeout=30_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=shots / "3-accuracy-vs-gflops.png")
        box = card.bounding_box()
        assert box["width"] >= 600, box  # MLflow's default: ~300 px, 3 a row (~170 beside the assistant)
        assert box["height"] >= 400, box
        legend = card.inner_text()
        assert "Unassigned" not in legend  # every charted run has a group (no parent run among them)
        assert "finetune.strategy: probe" in legend
        assert "finetune.strategy: fine_tune" in legend
        assert "Group by" in page.inner_text("body")
        browser.close()
    kept = SHOTS / "browser"
    kept.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        shutil.copy(shot, kept / shot.name)
    print(f"screenshots: {kept}")
