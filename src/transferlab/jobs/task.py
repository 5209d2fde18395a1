"""Hydra's task body: one job of a run or sweep, isolated so that a failing job never ends a sweep.

In a multirun a job that raises is recorded and the sweep goes on (Hydra's launchers would abort
the whole multirun); a single run raises as before. Either way one line says how the job ended.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from transferlab import console, tags
from transferlab.jobs.failures import failure_reason
from transferlab.jobs.ledger import JobRecord, SweepLedger
from transferlab.jobs.parallel import job_resources, join_submitit_tasks
from transferlab.jobs.resume import finished_job
from transferlab.jobs.returns import JobOutcome
from transferlab.jobs.run import run
from transferlab.tracking.identity import config_hash, hydra_run
from transferlab.tracking.links import ui_url
from transferlab.tracking.run import experiment_id, tracking_uri

JOB_LOG = "job.log"  # in the job's Hydra output folder: its own output, unless verbose


def quiet_lightning() -> None:
    """Drop per-job notices that drown the job lines; real warnings still show."""
    # "GPU available", the litlogger tip, the stepping-batches notice and "`Trainer.fit` stopped"
    # are all rank_zero_info on this logger.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # Lightning's own pytree helper still builds a LeafSpec, which torch deprecated.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Frozen stages are in eval mode on purpose (pretrained BN statistics stay fixed).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    console.quiet_libraries()  # timm's, MLflow's and Hydra's INFO lines only with -v


def _hydra_job() -> tuple[bool, int, list[str], Path | None, Path | None]:
    """(multirun?, job number, the job's overrides, sweep dir, the job's log file) from Hydra's
    runtime config."""
    if (hc := hydra_run()) is None:
        return False, 0, [], None, None
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    num = int(hc.job.num) if hc.job.get("num") is not None else 0
    log = Path(hc.runtime.output_dir) / JOB_LOG if multirun and hc.runtime.get("output_dir") else None
    return multirun, num, list(hc.overrides.task), Path(hc.sweep.dir) if multirun else None, log


def run_job(cfg: DictConfig) -> JobOutcome:
    """Hydra's task body. In a multirun a failing job is recorded and the sweep goes on; a single
    run raises as before. Either way one line says how the job ended; the sweeper gets a small
    JobOutcome back (jobs.returns)."""
    quiet_lightning()
    join_submitit_tasks()
    multirun, num, overrides, sweep_dir, log = _hydra_job()
    start = time.perf_counter()
    ledger = SweepLedger(sweep_dir) if multirun and sweep_dir is not None else None
    record = JobRecord(num, "FINISHED", ledger.varying(overrides) if ledger else " ".join(overrides), 0.0)
    console.sweep_job_started(f"job {num + 1}: {record.overrides}")
    try:
        with console.captured(log):  # a sweep job's epoch lines and warnings go to its job.log
            if (done := finished_job(cfg)) is not None:
                record.status, record.run_id = "SKIPPED", done.info.run_id
                record.test_acc = float(done.data.metrics.get("test/acc", math.nan))
            else:
                with job_resources(cfg, sweep_dir):
                    metrics = run(cfg)
                record.test_acc = float(metrics.get("test/acc", math.nan))
                if "test/acc" not in metrics and cfg.trainer.get("stop_after_epochs") is not None:
                    record.status = "PAUSED"  # a halving rung's budget: the run continues at the next rung
    except Exception as err:
        if not multirun:
            raise
        record.status, record.reason = "FAILED", failure_reason(err)
        if log is not None and not console.verbose():
            record.reason += f" (log: {log})"
    record.seconds = time.perf_counter() - start
    key = config_hash(cfg)
    if rank_zero_only.rank != 0:  # DDP ranks of one job: rank 0 speaks for it
        return JobOutcome(record.status, record.test_acc, "", key, str(cfg.cache_dir))
    client, exp_id = experiment_id(cfg.tracking)
    if not record.run_id:
        record.run_id = _latest_run_id(client, exp_id, key)
    if ledger is not None:
        ledger.add(record)
        console.sweep_job_ended(ledger.tally())
        console.result_line(ledger.progress_line(record))
    else:
        what = "skipped (already finished)" if record.status == "SKIPPED" else f"finished in {record.seconds:.1f}s"
        print(
            f"{what}: test/acc={record.test_acc:.4f} | run {record.run_id} | "
            f"{ui_url(exp_id, record.run_id, tracking_uri(cfg.tracking))}",
            flush=True,
        )
    return JobOutcome(record.status, record.test_acc, record.run_id, key, str(cfg.cache_dir))


def _latest_run_id(client, exp_id: str, key: str) -> str:
    query = f"tags.`{tags.CONFIG_HASH}` = '{key}'"
    found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else ""
