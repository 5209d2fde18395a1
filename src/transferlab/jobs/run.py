"""run(cfg) -> metrics: one job from config to MLflow run (marked FAILED or KILLED on error).

The order is the data flow: validate, check services, skip a finished job, resolve upstream
models (source, teacher: jobs.upstream trains them once), open or resume the run, fit (jobs.fit).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab import tags
from transferlab.config import validate
from transferlab.jobs.failures import format_traceback, report_failure
from transferlab.jobs.fit import BudgetReached, fit_and_test
from transferlab.jobs.resume import finished_job, job_checkpoint, resumable_run
from transferlab.jobs.target import check_target
from transferlab.jobs.upstream import resolve_checkpoint, resolve_teacher
from transferlab.preflight import check_devices, check_store
from transferlab.tracking.identity import (
    condition_hash,
    config_hash,
    flatten,
    hydra_run,
    job_run_name,
    stored_config,
)
from transferlab.tracking.run import RunTracker, tracking_uri
from transferlab.tracking.sweep_context import parent_run_id, swept_keys


def run(
    cfg: DictConfig,
    *,
    role: str = tags.ROLE_JOB,
    backbone_out: Path | None = None,
    extra_tags: dict[str, str] | None = None,
    run_name: str | None = None,
) -> dict[str, float]:
    """Train and test one job; every result lands in one MLflow run (marked FAILED on error)."""
    validate(cfg)
    check_devices(cfg.trainer)
    check_store(tracking_uri(cfg.tracking))  # seconds, not minutes of MLflow retries; before any data
    if done := finished_job(cfg):
        print(f"skipped: this exact job already finished as MLflow run {done.info.run_id}", flush=True)
        return dict(done.data.metrics)
    check_target(cfg)  # data, weights file, teacher: before a source model or teacher is trained
    checkpoint, source_tags = resolve_checkpoint(cfg, train=run)  # may train the source model first
    teacher = resolve_teacher(cfg, train=run)  # may train the teacher first
    tracker = RunTracker(cfg.tracking)
    key = config_hash(cfg)
    job = job_checkpoint(cfg, key, role)
    run_tags = {
        tags.ROLE: role,
        tags.CONFIG_HASH: key,
        tags.CONDITION_HASH: condition_hash(cfg),
        tags.SEED: str(cfg.seed),
        **source_tags,
        **(extra_tags or {}),
    }
    if resumed := resumable_run(job, cfg.tracking, key):
        tracker.attach(resumed)
        if role == tags.ROLE_JOB and (parent := parent_run_id()):
            tracker.set_tags({"mlflow.parentRunId": parent})  # it finishes under this sweep
        print(f"resuming MLflow run {resumed} from {job.dir}", flush=True)
    else:
        if tracker.enabled and job.enabled:
            job.discard()  # a stale state whose run is gone or finished
        tracker.start(run_name or job_run_name(cfg, swept_keys()), run_tags, parent_run_id() if role == "job" else None)
        job.bind(tracker.run_id)
    try:
        if not resumed:
            # The config goes in first, so a run that fails later still says what it was.
            tracker.log_params(flatten(stored_config(cfg)) | _hydra_overrides())
            tracker.log_text(OmegaConf.to_yaml(stored_config(cfg), resolve=True), "config.yaml")
        metrics = fit_and_test(cfg, tracker, checkpoint, teacher, backbone_out, job)
    except BudgetReached as stopped:  # a halving rung: run and checkpoint wait for the next rung
        tracker.end("SCHEDULED")
        print(f"paused after epoch {stopped.epoch}: MLflow run {tracker.run_id} continues at the next rung", flush=True)
        return stopped.metrics
    except BaseException as err:
        status, reason = report_failure(err)
        with contextlib.suppress(Exception):  # the store or disk that failed the job may refuse these too
            tracker.set_tags({tags.FAILURE: reason})
            tracker.log_text(format_traceback(err), "error/traceback.txt")
        tracker.end(status)
        if status == "FAILED" and tracker.enabled and job.enabled:
            job.discard()  # a job that raised reruns from scratch; only killed ones resume
        raise
    tracker.end()
    if tracker.enabled and job.enabled:
        job.discard()  # finished: its checkpoints are no longer needed
    return metrics


def _hydra_overrides() -> dict[str, str]:
    hc = hydra_run()  # None: not launched by Hydra (tests, reproduce)
    return {} if hc is None else {"hydra.overrides": " ".join(hc.overrides.task)}
