"""The Hydra sweep callback: a parent MLflow run around a multirun, and the report at its end.

Jobs find their parent through `tracking.sweep_context`, which this callback sets.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab import console, tags
from transferlab.config import sweep_grid
from transferlab.jobs.ledger import SweepLedger
from transferlab.studies.report import write_report
from transferlab.tracking import sweep_context
from transferlab.tracking.links import set_default_view, ui_url
from transferlab.tracking.run import RunTracker, experiment_id, tracking_uri


class SweepCallback(Callback):
    """Hydra callback: a parent MLflow run around a multirun, and the report at its end."""

    open_run: tuple[str, str] | None = None  # (uri, run id) of a sweep that has not ended yet
    ledger: SweepLedger | None = None  # the running (or last) sweep's job records
    failed: int = 0  # failed jobs of the last sweep: the CLI exits non-zero

    @classmethod
    def fail_unfinished(cls, status: str = "FAILED") -> None:
        """Mark the parent run FAILED (or KILLED) when the multirun aborted (Hydra skips the end hook)."""
        console.close_sweep()
        if cls.open_run is not None:
            uri, run_id = cls.open_run
            cls.open_run = None
            sweep_context.leave()
            mlflow.MlflowClient(uri).set_terminated(run_id, status)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        console.quiet_libraries()  # Hydra's "#N : overrides" line per job only with -v
        tracker = RunTracker(config.tracking)
        tracker.start(f"sweep-{config.study}", {tags.ROLE: tags.ROLE_SWEEP})
        if tracker.run_id is None:
            return
        tracker.log_params({"study": str(config.study)})
        sweep_dir = Path(config.hydra.sweep.dir)
        total, swept = sweep_grid(list(config.hydra.overrides.task), OmegaConf.select(config, "hydra.sweeper.params"))
        sweep_context.enter(tracker.run_id, swept, sweep_dir)
        SweepCallback.ledger = SweepLedger(sweep_dir)
        SweepCallback.ledger.begin(total, swept)
        SweepCallback.failed = 0
        SweepCallback.open_run = (tracking_uri(config.tracking), tracker.run_id)
        # A live line only where the jobs run in this process (Hydra's basic launcher); workers of
        # other launchers print their job lines themselves.
        in_process = str(OmegaConf.select(config, "hydra.launcher._target_", default="")).endswith("BasicLauncher")
        console.start_sweep(f"sweep {config.study}", total, live=in_process)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        console.close_sweep()
        SweepCallback.open_run = None
        run_id = sweep_context.leave()
        if run_id is None:
            return
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
        client, exp_id = experiment_id(config.tracking)
        counts["pruned"] = _pruned(client, exp_id, run_id)  # halving: job runs stopped at a rung
        tracker.log_metrics({f"{tags.SWEEP_COUNT}{k}": v for k, v in counts.items()})
        summary = ledger.summary_line(str(config.study))
        tracker.set_tags({tags.SWEEP_SUMMARY: summary[:5000]})
        tracker.end("FAILED" if counts["failed"] else "FINISHED")
        print(summary, flush=True)
        uri = tracking_uri(config.tracking)
        set_default_view(client, exp_id)  # the view the link opens, also in stores made before it
        print(f"runs: {ui_url(exp_id, uri=uri)}  (serve a local store: transferlab ui)")
        print(f"sweep run (best per target, report): {ui_url(exp_id, run_id, uri=uri)}", flush=True)


def _pruned(client: mlflow.MlflowClient, exp_id: str, run_id: str) -> int:
    """Job runs of this sweep that a halving sweeper stopped early (tagged, ended KILLED)."""
    query = f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`{tags.PRUNED}` != ''"
    return len(client.search_runs([exp_id], query, max_results=50000))
