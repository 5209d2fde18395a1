"""The Hydra sweep callback: a parent MLflow run around a multirun, and the report at its end.

Jobs find their parent through an environment variable (same process) or a file in the sweep
directory (launchers that start a process per job).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab.execution import SweepLedger, ui_url
from transferlab.identity import hydra_run
from transferlab.tracking import RunTracker, experiment_id, tracking_uri

PARENT_ENV = "TRANSFERLAB_PARENT_RUN_ID"
SWEPT_ENV = "TRANSFERLAB_SWEPT_KEYS"  # keys the running sweep varies: job run names show them
PARENT_FILE = "parent_run_id"


def parent_run_id() -> str | None:
    """The sweep's parent run: set by SweepCallback in this process, or found in the sweep dir
    (launchers that start a process per job)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    from hydra.types import RunMode

    if (hydra_cfg := hydra_run()) is None:
        return None
    marker = Path(hydra_cfg.sweep.dir) / PARENT_FILE
    return marker.read_text().strip() if hydra_cfg.mode == RunMode.MULTIRUN and marker.exists() else None


def sweep_grid(config: DictConfig) -> tuple[int, list[str]]:
    """(number of jobs, keys that vary) of the multirun: command-line sweeps over the experiment's
    sweeper params."""
    parser = OverridesParser.create()
    sizes = {}
    for key, value in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items():
        override = parser.parse_override(f"{key}={value}")
        sizes[key] = len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
    for override in parser.parse_overrides(list(config.hydra.overrides.task)):
        key = override.get_key_element()
        sizes[key] = len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
    return math.prod(sizes.values()), [key for key, size in sizes.items() if size > 1]


class SweepCallback(Callback):
    """Hydra callback: a parent MLflow run around a multirun, and the report at its end."""

    open_run: tuple[str, str] | None = None  # (uri, run id) of a sweep that has not ended yet
    ledger: SweepLedger | None = None  # the running (or last) sweep's job records
    failed: int = 0  # failed jobs of the last sweep: the CLI exits non-zero

    @classmethod
    def fail_unfinished(cls, status: str = "FAILED") -> None:
        """Mark the parent run FAILED (or KILLED) when the multirun aborted (Hydra skips the end hook)."""
        if cls.open_run is not None:
            uri, run_id = cls.open_run
            cls.open_run = None
            os.environ.pop(PARENT_ENV, None)
            mlflow.MlflowClient(uri).set_terminated(run_id, status)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracker = RunTracker(config.tracking)
        tracker.start(f"sweep-{config.study}", {"transferlab.role": "sweep"})
        if tracker.run_id is None:
            return
        tracker.log_params({"study": str(config.study)})
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(tracker.run_id)
        SweepCallback.ledger = SweepLedger(sweep_dir)
        SweepCallback.ledger.begin(*sweep_grid(config))
        os.environ[SWEPT_ENV] = ",".join(sweep_grid(config)[1])
        SweepCallback.failed = 0
        os.environ[PARENT_ENV] = tracker.run_id
        SweepCallback.open_run = (tracking_uri(config.tracking), tracker.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCallback.open_run = None
        run_id = os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
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
        ledger = SweepLedger(config.hydra.sweep.dir)
        counts = ledger.counts()
        SweepCallback.failed = counts["failed"]
        tracker = RunTracker(config.tracking)
        tracker.attach(run_id)
        _, exp_id = experiment_id(config.tracking)
        tracker.log_metrics({f"sweep/{k}": v for k, v in counts.items()})
        summary = ledger.summary_line(str(config.study))
        tracker.set_tags({"transferlab.sweep_summary": summary[:5000]})
        tracker.end("FAILED" if counts["failed"] else "FINISHED")
        print(summary, flush=True)
        print(f"runs: {ui_url(exp_id, uri=tracking_uri(config.tracking))}  (serve a local store: transferlab ui)")
