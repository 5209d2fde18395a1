"""Executing jobs: failure isolation, one line per job, the sweep summary, quiet Lightning.

A job that raises inside a multirun is recorded (FAILED run, traceback artifact, one-line reason
tag) and the sweep runs on; Hydra's launchers would otherwise abort the whole multirun. Each
job leaves a small JSON record in the sweep directory, so the per-job line and the summary work
the same whether jobs run in this process (basic), in workers (joblib) or on other hosts (submitit).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from transferlab.errors import TransferlabError
from transferlab.identity import hydra_run
from transferlab.links import ui_url

RECORDS_DIR = "jobs"
REASON_TAG = "transferlab.failure"


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


def failure_reason(err: BaseException) -> str:
    """One line naming what went wrong and, where known, what to change."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "CUDA out of memory: lower data.batch_size or use a smaller backbone"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:500] if first else type(err).__name__


class NonFiniteLoss(TransferlabError):
    """The training loss became NaN or infinite."""


class FailOnNonFiniteLoss(pl.Callback):
    """Fail the job at the first NaN/inf loss instead of training on garbage for hours."""

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            epoch = getattr(module, "epoch_offset", 0) + trainer.current_epoch
            raise NonFiniteLoss(
                f"training loss is {float(loss)} at epoch {epoch}, batch {batch_idx}: lower optim.lr or check the data"
            )


@dataclass
class JobRecord:
    num: int
    status: str  # FINISHED | FAILED | SKIPPED
    overrides: str
    seconds: float
    run_id: str = ""
    test_acc: float = math.nan
    reason: str = ""
    ended: float = field(default_factory=time.time)


class SweepLedger:
    """The sweep directory's record of jobs: total, start time, one JSON file per ended job."""

    def __init__(self, sweep_dir: Path | str) -> None:
        self.dir = Path(sweep_dir) / RECORDS_DIR

    def begin(self, total: int, swept: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"total": total, "swept": swept, "started": time.time()}
        (self.dir / "sweep.json").write_text(json.dumps(meta))

    @property
    def meta(self) -> dict:
        path = self.dir / "sweep.json"
        return json.loads(path.read_text()) if path.exists() else {"total": 0, "swept": [], "started": time.time()}

    def varying(self, overrides: list[str]) -> str:
        """Only the overrides that differ between jobs: the line stays readable."""
        swept = set(self.meta.get("swept") or [])
        return " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept) or " ".join(overrides)

    def add(self, record: JobRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{record.num}.tmp"
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.dir / f"{record.num}.json")  # atomic: a reader never sees half a record

    def records(self) -> list[JobRecord]:
        return sorted(
            (JobRecord(**json.loads(p.read_text())) for p in self.dir.glob("[0-9]*.json")), key=lambda r: r.num
        )

    def counts(self) -> dict[str, int]:
        records = self.records()
        return {s.lower(): sum(r.status == s for r in records) for s in ("FINISHED", "FAILED", "SKIPPED")}

    def progress_line(self, record: JobRecord) -> str:
        meta, counts = self.meta, self.counts()
        total, done = int(meta["total"]) or record.num + 1, sum(counts.values())
        elapsed = time.time() - float(meta["started"])
        eta = elapsed / max(done, 1) * max(total - done, 0)
        result = f"test/acc={record.test_acc:.4f}" if record.status != "FAILED" else record.reason
        tally = f"{counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} skipped"
        return (
            f"[job {record.num + 1}/{total}] {record.status} {record.overrides or '(no overrides)'} | {result} | "
            f"{record.seconds:.1f}s | run {record.run_id or '-'} | {tally} | "
            f"elapsed {_clock(elapsed)} ETA {_clock(eta)}"
        )

    def summary_line(self, study: str) -> str:
        records, counts = self.records(), self.counts()
        failed = "; ".join(f"{r.overrides} ({r.reason})" for r in records if r.status == "FAILED")
        elapsed = time.time() - float(self.meta["started"])
        line = (
            f"sweep {study}: {counts['finished']} finished, {counts['failed']} failed, "
            f"{counts['skipped']} skipped of {self.meta['total']} in {_clock(elapsed)}"
        )
        return f"{line}; failed: {failed}" if failed else line


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _hydra_job() -> tuple[bool, int, list[str], Path | None]:
    """(multirun?, job number, the job's overrides, sweep dir) from Hydra's runtime config."""
    if (hc := hydra_run()) is None:
        return False, 0, [], None
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    num = int(hc.job.num) if hc.job.get("num") is not None else 0
    return multirun, num, list(hc.overrides.task), Path(hc.sweep.dir) if multirun else None


def run_job(cfg: DictConfig) -> float:
    """Hydra's task body. In a multirun a failing job is recorded and the sweep goes on; a single
    run raises as before. Either way one line says how the job ended."""
    from transferlab.parallel import job_resources, join_submitit_tasks
    from transferlab.tracking import experiment_id, finished_run, tracking_uri
    from transferlab.train import run

    quiet_lightning()
    join_submitit_tasks()
    multirun, num, overrides, sweep_dir = _hydra_job()
    start = time.perf_counter()
    ledger = SweepLedger(sweep_dir) if multirun and sweep_dir is not None else None
    record = JobRecord(num, "FINISHED", ledger.varying(overrides) if ledger else " ".join(overrides), 0.0)
    try:
        done = finished_run(cfg.tracking, _config_hash(cfg)) if cfg.tracking.resume else None
        if done is not None:
            record.status, record.run_id = "SKIPPED", done.info.run_id
            record.test_acc = float(done.data.metrics.get("test/acc", math.nan))
        else:
            with job_resources(cfg, sweep_dir):
                metrics = run(cfg)
            record.test_acc = float(metrics.get("test/acc", math.nan))
    except Exception as err:
        if not multirun:
            raise
        record.status, record.reason = "FAILED", failure_reason(err)
    record.seconds = time.perf_counter() - start
    if rank_zero_only.rank != 0:  # DDP ranks of one job: rank 0 speaks for it
        return record.test_acc
    client, exp_id = experiment_id(cfg.tracking)
    if not record.run_id:
        record.run_id = _latest_run_id(client, exp_id, _config_hash(cfg))
    if ledger is not None:
        ledger.add(record)
        print(ledger.progress_line(record), flush=True)
    else:
        what = "skipped (already finished)" if record.status == "SKIPPED" else f"finished in {record.seconds:.1f}s"
        print(
            f"{what}: test/acc={record.test_acc:.4f} | run {record.run_id} | "
            f"{ui_url(exp_id, record.run_id, tracking_uri(cfg.tracking))}",
            flush=True,
        )
    return record.test_acc


def _config_hash(cfg: DictConfig) -> str:
    from transferlab.identity import config_hash

    return config_hash(cfg)


def _latest_run_id(client, exp_id: str, config_hash: str) -> str:
    query = f"tags.`transferlab.config_hash` = '{config_hash}'"
    found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else ""


def resume_command(args: list[str]) -> str:
    """The command that resumes an interrupted sweep: the same one, with resume on (the default)."""
    kept = [a for a in args if not a.startswith("tracking.resume=")]
    return shlex.join(["transferlab", "train", *kept])


def report_failure(err: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for a job's MLflow run that ended with `err`."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    return status, failure_reason(err)


def format_traceback(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def print_interrupted(ledger: SweepLedger | None, args: list[str]) -> None:
    """On Ctrl-C: what finished, and the exact command that resumes."""
    if ledger is not None:
        counts = ledger.counts()
        done = f"{counts['finished']} of {ledger.meta['total']} jobs finished ({counts['failed']} failed, "
        done += f"{counts['skipped']} skipped)"
    else:
        done = "the job did not finish"
    print(f"\ninterrupted: {done}; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
