"""The Hydra sweep callback: a parent MLflow run around a multirun, and the report at its end.

Jobs find their parent through an environment variable (same process) or a file in the sweep
directory (launchers that start a process per job).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from transferlab.tracking import RunTracker, tracking_uri

PARENT_ENV = "TRANSFERLAB_PARENT_RUN_ID"
PARENT_FILE = "parent_run_id"


def parent_run_id() -> str | None:
    """The sweep's parent run: set by SweepCallback in this process, or found in the sweep dir
    (launchers that start a process per job)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    marker = Path(hydra_cfg.sweep.dir) / PARENT_FILE
    return marker.read_text().strip() if hydra_cfg.mode.name == "MULTIRUN" and marker.exists() else None


class SweepCallback(Callback):
    """Hydra callback: a parent MLflow run around a multirun, and the report at its end."""

    open_run: tuple[str, str] | None = None  # (uri, run id) of a sweep that has not ended yet

    @classmethod
    def fail_unfinished(cls) -> None:
        """Mark the parent run FAILED when a job aborted the multirun (Hydra skips the end hook)."""
        if cls.open_run is not None:
            uri, run_id = cls.open_run
            cls.open_run = None
            os.environ.pop(PARENT_ENV, None)
            mlflow.MlflowClient(uri).set_terminated(run_id, "FAILED")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracker = RunTracker(config.tracking)
        tracker.start(f"sweep-{config.study}", {"transferlab.role": "sweep"})
        if tracker.run_id is None:
            return
        tracker.log_params({"study": str(config.study)})
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(tracker.run_id)
        os.environ[PARENT_ENV] = tracker.run_id
        SweepCallback.open_run = (tracking_uri(config.tracking), tracker.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCallback.open_run = None
        run_id = os.environ.pop(PARENT_ENV, None)
        if run_id is None:
            return
        from transferlab.report import write_report

        try:
            path = write_report(
                config.tracking.experiment,
                Path("reports") / str(config.study),
                tracking_uri(config.tracking),
                run_id,
            )
            print(f"report: {path}")
        except Exception as err:  # a report problem must not hide the sweep's results
            warnings.warn(f"report failed: {err}", stacklevel=1)
        mlflow.MlflowClient(tracking_uri(config.tracking)).set_terminated(run_id, "FINISHED")
