"""Writes to a tracking store that may go away mid-run: buffer, retry, never lose or fake.

A job keeps training while its store is down: failed writes queue up in order (files are
copied to a local spool, they may be temporary) and are retried before later writes and at the
end. If the store still refuses when the run ends, everything the run logged is saved locally,
the path printed, and the job fails: a run is never marked FINISHED with metrics missing.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from transferlab.errors import TransferlabError

MAX_ENTITIES, MAX_TAGS = 1000, 100  # per log_batch call (MLflow's limits)

# Errors that retrying cannot fix: raise them at once instead of buffering.
PERMANENT = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST")


class StoreLostError(TransferlabError):
    """The store did not come back before the run ended; its record is saved locally."""


def is_transient(err: BaseException) -> bool:
    """A store that does not answer (worth retrying), not a local disk that refuses to write."""
    if isinstance(err, MlflowException):
        return err.error_code not in PERMANENT
    return isinstance(err, ConnectionError | TimeoutError) or type(err).__module__.startswith(("requests", "urllib3"))


class BufferedClient:
    """The writes of one run through `MlflowClient`, buffered while the store is unreachable."""

    def __init__(
        self,
        client: mlflow.MlflowClient,
        run_id: str,
        spool: Path,
        retry_seconds: float,
        pause_s: float = 5.0,
        defer_s: float = 0.0,
    ) -> None:
        self.client, self.run_id, self.spool = client, run_id, spool
        self.retry_seconds, self.pause_s = retry_seconds, pause_s
        self.pending: list[tuple[str, tuple, dict]] = []
        self.record: dict[str, dict[str, Any]] = {"params": {}, "metrics": {}, "tags": {}}
        self.texts: dict[str, str] = {}
        self.next_try = 0.0
        self.lost_since: float | None = None
        self.defer_s = defer_s
        self.deferred_since = math.inf  # when the oldest deferred write was queued

    def log_batch(
        self, metrics: list[Metric] = (), params: list[Param] = (), tags: list[RunTag] = (), defer: bool = False
    ) -> None:
        """`defer`: queue the write; it goes with the next one that is not deferred, with `flush()`,
        or once the oldest queued write has waited `defer_s`. Batches without params queued one
        after another merge into one write (a write to a SQLite store costs ~20 ms, whatever its size)."""
        self.record["params"] |= {p.key: p.value for p in params}
        self.record["tags"] |= {t.key: t.value for t in tags}
        for m in metrics:
            self.record["metrics"].setdefault(m.key, []).append({"step": m.step, "value": m.value})
        batch = {"metrics": list(metrics), "params": list(params), "tags": list(tags)}
        last = self.pending[-1][2] if self.pending and self.pending[-1][0] == "log_batch" else None
        if last is not None and _mergeable(last, batch):
            last["metrics"] += batch["metrics"]
            last["tags"] += batch["tags"]
        else:
            self.pending.append(("log_batch", (self.run_id,), batch))
        now = time.monotonic()
        self.deferred_since = min(self.deferred_since, now)
        if not defer or now - self.deferred_since >= self.defer_s:
            self.flush()

    def log_text(self, text: str, path: str) -> None:
        self.texts[path] = text
        self._write("log_text", self.run_id, text, path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        method = "log_artifacts" if path.is_dir() else "log_artifact"
        if self.flush() and self._try(method, (self.run_id, str(path), artifact_path), {}):  # deferred first
            return
        copy = self.spool / "artifacts" / (artifact_path or "") / path.name  # the original may be temporary
        copy.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
        self.pending.append((method, (self.run_id, str(copy), artifact_path), {}))

    def _write(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.pending.append((method, args, kwargs))
        self.flush()

    def _try(self, method: str, args: tuple, kwargs: dict) -> bool:
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as err:
            if isinstance(err, OSError) and not is_transient(err):  # disk full, read-only, permissions
                raise TransferlabError(
                    f"could not write to the artifact location of run {self.run_id} ({err.strerror or err}): "
                    "free space or fix its permissions, or set tracking.artifact_root in a new study"
                ) from err
            if not is_transient(err):
                raise
            if self.lost_since is None:
                self.lost_since = time.monotonic()
                reason = str(err).splitlines()[0][:160]
                print(f"tracking store unreachable ({reason}): training goes on, logs are buffered", file=sys.stderr)
            self.next_try = time.monotonic() + self.pause_s
            return False
        return True

    def flush(self, force: bool = False) -> bool:
        """Send queued writes in order; stop at the first failure. True when none are left.
        While the store is down, tries at most every `pause_s` (unless forced)."""
        if not force and time.monotonic() < self.next_try:
            return not self.pending
        while self.pending:
            try:
                if not self._try(*self.pending[0]):
                    return False
            except Exception:  # not retryable: dropped, so later writes still go through
                self.pending.pop(0)
                raise
            self.pending.pop(0)
        self.deferred_since = math.inf
        if self.lost_since is not None:
            print("tracking store is back: buffered logs written", file=sys.stderr)
            self.lost_since = None
        return True

    def drain(self) -> None:
        """Retry for up to `retry_seconds`; then save the run locally and raise StoreLostError."""
        deadline = time.monotonic() + self.retry_seconds
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                path = self.save_locally()
                raise StoreLostError(
                    f"tracking store {self.client.tracking_uri} unreachable: {len(self.pending)} writes of run "
                    f"{self.run_id} not logged; its metrics and config are saved in {path}"
                )
            time.sleep(min(self.pause_s, max(0.1, deadline - time.monotonic())))

    def save_locally(self) -> Path:
        self.spool.mkdir(parents=True, exist_ok=True)
        for name, value in self.record.items():
            (self.spool / f"{name}.json").write_text(json.dumps(value, indent=1, sort_keys=True))
        for path, text in self.texts.items():
            (self.spool / path).parent.mkdir(parents=True, exist_ok=True)
            (self.spool / path).write_text(text)
        return self.spool


def _mergeable(into: dict[str, list], batch: dict[str, list]) -> bool:
    """Within MLflow's limits per call, no params (they must be unique) and no tag set twice."""
    if into["params"] or batch["params"] or len(into["tags"]) + len(batch["tags"]) > MAX_TAGS:
        return False
    if sum(len(into[k]) + len(batch[k]) for k in ("metrics", "tags")) > MAX_ENTITIES:
        return False
    return not {t.key for t in into["tags"]} & {t.key for t in batch["tags"]}
