"""What a sweep prints: by default a result line per job and the summary, with each job's epoch
lines in its own job.log; `-v` streams them. When stdout is not a terminal, no redraws."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST
from transferlab import console
from transferlab.cli import _verbosity

SWEEP = [*FAST, "finetune=probe", "study=quiet"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV} | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("epoch ")]


@pytest.mark.slow
def test_a_sweep_prints_a_line_per_job_and_hides_epochs_unless_verbose(store: str, tmp_path: Path) -> None:
    quiet = _cli("train", "-m", *SWEEP, "seed=0,1,2", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = (quiet.stdout + quiet.stderr).splitlines()
    jobs = [line for line in out if line.startswith("[job ")]
    assert len(jobs) == 3
    assert len(out) <= 2 * 3 + 3, out  # at most 2 lines per job, plus report, summary and link
    assert _epoch_lines(quiet.stdout + quiet.stderr) == []
    assert not [line for line in out if "[HYDRA]" in line or "INFO" in line], out  # launcher and library INFO
    assert "\r" not in quiet.stdout + quiet.stderr  # not a terminal: plain lines, no redraws
    logs = sorted((tmp_path / "multirun").rglob("job.log"))
    assert len(logs) == 3
    assert all(_epoch_lines(p.read_text()) for p in logs)  # the epochs are in each job's log

    loud = _cli("train", "-v", "-m", *SWEEP, "seed=3", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert _epoch_lines(loud.stdout)
    assert "#0 : " in loud.stdout + loud.stderr  # Hydra's launcher line
    assert [line for line in loud.stdout.splitlines() if line.startswith("[job 1/1] FINISHED")]


def test_verbose_flag_is_stripped_and_reaches_the_jobs(monkeypatch) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # restored (removed) after the test
    assert not console.verbose()
    assert _verbosity(["-v", "-m", "seed=0,1"]) == ["-m", "seed=0,1"]
    assert os.environ[console.VERBOSE_ENV] == "1"  # launcher workers read it
    assert console.verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert _verbosity(["-m", "seed=0"]) == ["-m", "seed=0"]
    assert not console.verbose()


def test_library_info_lines_only_when_verbose(monkeypatch) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.quiet_libraries()
    assert not logging.getLogger("timm.models._builder").isEnabledFor(logging.INFO)
    assert not logging.getLogger("hydra._internal.core_plugins.basic_launcher").isEnabledFor(logging.INFO)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.quiet_libraries()
    logging.getLogger().setLevel(logging.INFO)
    try:
        assert logging.getLogger("timm.models._builder").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().setLevel(logging.WARNING)


def test_captured_output_goes_to_the_log_and_the_result_line_does_not(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    log = tmp_path / "job.log"
    with console.captured(log):
        print("epoch 0: train/loss=1.0")
        print("a warning", file=sys.stderr)
    console.result_line("[job 1/1] FINISHED")
    out, err = capsys.readouterr()
    assert out == "[job 1/1] FINISHED\n"
    assert err == ""
    assert log.read_text() == "epoch 0: train/loss=1.0\na warning\n"
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.captured(log):
        print("shown")
    assert capsys.readouterr().out == "shown\n"


def test_a_long_step_off_a_terminal_prints_plain_lines(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    with console.step("decoding 10 images", total=10) as advance:
        advance(10)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "decoding 10 images ..."
    assert lines[1].startswith("decoding 10 images: done in ")
    with console.step("quick", total=1, min_seconds=60) as advance:
        advance(1)
    assert capsys.readouterr().out == ""  # a short step says nothing


@pytest.mark.parametrize("verbose", [False, True])
def test_pretrain_hides_library_info_lines_unless_verbose(verbose, monkeypatch, capfd) -> None:
    """`transferlab pretrain` once printed MLflow's database notices and Lightning's device lines
    around its epoch lines; they are for -v now, as in a sweep."""
    import transferlab.jobs.upstream
    from transferlab.cli import main

    def source(cfg, train):
        for name in ("mlflow.store.db.utils", "pytorch_lightning.utilities.rank_zero"):
            logging.getLogger(name).info("library notice from %s", name)
        return "backbone.safetensors", {"transferlab.source_run_id": "r1"}

    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.setattr(transferlab.jobs.upstream, "ensure_source", source)
    logging.getLogger().setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as Lightning and MLflow add
    logging.getLogger().addHandler(handler)
    try:
        assert main(["pretrain", *(["-v"] if verbose else [])]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
    out, err = capfd.readouterr()
    assert "source model: backbone.safetensors" in out
    assert ("library notice" in err) == verbose
