"""What a job hands back to its sweeper, and nothing more.

Hydra's basic launcher and sweeper keep every job's `JobReturn` until the sweep ends, and each one
carries the job's config and Hydra config (~140 KB a job measured: ~140 MB over 1,000 jobs);
joblib's and Ray's workers pickle them back to the sweep process. A job's task returns a small
`JobOutcome`, and `SmallJobReturns` drops the two configs from the `JobReturn` as the job ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


@dataclass(frozen=True)
class JobOutcome:
    """The task's return value: how the job ended and where its run and checkpoint live
    (the halving sweeper reads it to score and prune the job)."""

    status: str  # FINISHED | FAILED | SKIPPED | PAUSED (jobs.ledger.JobRecord)
    test_acc: float
    run_id: str
    config_hash: str
    cache_dir: str


class SmallJobReturns(Callback):
    """Hydra callback (conf/config.yaml): a finished job's `JobReturn` keeps its overrides, status
    and `JobOutcome`; its config copies go, so a sweep's memory does not grow with its jobs."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job_return.cfg = None
        job_return.hydra_cfg = None
