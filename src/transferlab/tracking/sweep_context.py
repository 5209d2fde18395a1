"""The running sweep as a job sees it: its parent MLflow run and the keys it varies.

The sweep callback (studies.sweep) sets both; jobs read them here, in this process (basic
launcher) through environment variables or, from another process (joblib, submitit, Ray),
through a file in the sweep directory. Jobs never import the callback that sits above them.
"""

from __future__ import annotations

import os
from pathlib import Path

from transferlab.tracking.identity import hydra_run

PARENT_ENV = "TRANSFERLAB_PARENT_RUN_ID"
SWEPT_ENV = "TRANSFERLAB_SWEPT_KEYS"  # keys the running sweep varies: job run names show them
PARENT_FILE = "parent_run_id"


def parent_run_id() -> str | None:
    """The sweep's parent run: set by the sweep callback in this process, or found in the sweep
    dir (launchers that start a process per job)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    from hydra.types import RunMode

    if (hydra_cfg := hydra_run()) is None:
        return None
    marker = Path(hydra_cfg.sweep.dir) / PARENT_FILE
    return marker.read_text().strip() if hydra_cfg.mode == RunMode.MULTIRUN and marker.exists() else None


def swept_keys() -> list[str]:
    """Keys this sweep varies (its grid and command-line sweeps), for job run names."""
    varied = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    if (hc := hydra_run()) is not None:
        varied += [k for k in hc.sweeper.get("params") or {} if k not in varied]
    return varied


def enter(run_id: str, swept: list[str], sweep_dir: Path) -> None:
    """Make `run_id` the parent of every job of this sweep, here and in other processes."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_FILE).write_text(run_id)
    os.environ[SWEPT_ENV] = ",".join(swept)
    os.environ[PARENT_ENV] = run_id


def leave() -> str | None:
    """End the sweep context; -> the parent run id it had."""
    os.environ.pop(SWEPT_ENV, None)
    return os.environ.pop(PARENT_ENV, None)
