"""benchmarks/gpu_check.py: its CPU dry run exercises every row's code path, so the GPU check
cannot rot before a GPU is lent; a row that fails or hangs is recorded, never raised."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
ROWS = ["transforms", "train_rate", "compile", "probe", "sweep"]


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| # ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


@pytest.mark.slow
def test_dry_run_fills_all_five_rows_and_records_a_forced_failure(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--force-fail", "probe", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # one row failed; no crash
    rows = _rows(out.read_text())
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    status = dict(zip(ROWS, (r[4] for r in rows), strict=True))
    assert status["probe"].startswith("fail: RuntimeError: forced failure"), status
    assert "x: " in rows[3][2]  # the value measured before the forced failure is kept
    assert status["transforms"].startswith("skipped: no CUDA"), status  # found the CUDA-only tests, ran pytest
    assert status["train_rate"] == status["compile"] == "ran", status  # measured; targets are GPU-only
    assert status["sweep"] == "pass", status
    assert rows[4][2].startswith("4 of 4 FINISHED"), rows[4]
    assert all(float(r[5]) > 0 for r in rows)
    assert out.read_text() in result.stdout  # printed as well as written


def test_a_row_past_its_timeout_is_a_failure_with_its_partial_value(gpu_check, tmp_path: Path) -> None:
    hang = f'print({gpu_check.RESULT!r} + \'{{"value": "half done"}}\', flush=True); import time; time.sleep(60)'
    start = time.perf_counter()
    outcome = gpu_check.run_row([sys.executable, "-c", hang], timeout=3, log=tmp_path / "row.log")
    assert time.perf_counter() - start < 30
    assert outcome.status == "fail: timed out after 3 s"
    assert outcome.value == "half done"


def test_a_row_that_crashes_is_a_failure_with_its_last_line(gpu_check, tmp_path: Path) -> None:
    outcome = gpu_check.run_row([sys.executable, "-c", "raise SystemExit('segfault-ish')"], 30, tmp_path / "row.log")
    assert outcome.status == "fail: exit code 1: segfault-ish"
    assert outcome.value == "-"


def test_the_cuda_only_tests_are_found(gpu_check) -> None:
    assert "tests/test_store.py::test_gpu_transform_matches_cpu" in gpu_check.cuda_only_tests()
