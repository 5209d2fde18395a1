"""The quoted results (README, docs/) must be the recorded run's: regenerate with `make docs`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from transferlab.studies.readme_results import BEGIN, END, ROOT, readme_block, recorded, results_block, update_docs
from transferlab.studies.report import results_table

RECORDED_RUN = ROOT / "docs" / "default_summary.csv"
needs_recorded_run = pytest.mark.skipif(
    not RECORDED_RUN.exists(),
    reason="no recorded default study in docs/ yet: run `make sweep && make docs` to record one",
)


@needs_recorded_run
def test_readme_quotes_the_recorded_summary() -> None:
    assert readme_block() == results_block(*recorded()), "README results are stale: run `make docs`"


@needs_recorded_run
def test_docs_report_is_the_recorded_run() -> None:
    report = (ROOT / "docs" / "default_report.md").read_text()
    summary, _ = recorded()
    assert "\n".join(results_table(summary)) in report
    (software,) = [line for line in report.splitlines() if line.startswith("- software: ")]
    assert "torch " in software
    assert "timm " in software
    assert (ROOT / "docs" / "accuracy_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_docs_rewrites_only_the_results_block(tmp_path: Path) -> None:
    from test_report import _tradeoff_tables

    (tmp_path / "docs").mkdir()
    report = tmp_path / "report"
    report.mkdir()
    tables = _tradeoff_tables()
    summary, pairs = tables.summary.copy(), tables.pairs
    summary.loc[0, "acc_mean_pct"] = 12.345  # a "new run"
    summary.to_csv(report / "summary.csv", index=False)
    pairs.to_csv(report / "pairs.csv", index=False)
    (report / "report.md").write_text("# new\n")
    shutil.copyfile(ROOT / "docs" / "accuracy_vs_compute.png", report / "accuracy_vs_compute.png")
    (tmp_path / "README.md").write_text(f"intro\n{BEGIN}\n| stale |\n{END}\noutro\n")
    update_docs(report, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n")
    assert text.endswith("\noutro\n")
    assert "| stale |" not in text
    assert "| 12.3 (" in text
    assert "Cheapest within noise of it: probe: 0.31x the FLOPs" in text  # findings per target
    assert pd.read_csv(tmp_path / "docs" / "default_summary.csv")["acc_mean_pct"][0] == 12.345
