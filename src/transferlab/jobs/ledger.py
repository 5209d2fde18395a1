"""The sweep directory's record of jobs: one line per job, the summary, the resume command.

Each job leaves a small JSON record in the sweep directory, so the per-job line and the summary
work the same whether jobs run in this process (basic), in workers (joblib) or on other hosts
(submitit).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORDS_DIR = "jobs"


@dataclass
class JobRecord:
    num: int
    status: str  # FINISHED | FAILED | SKIPPED | PAUSED (a halving rung's budget reached)
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
        return {s.lower(): sum(r.status == s for r in records) for s in ("FINISHED", "FAILED", "SKIPPED", "PAUSED")}

    def tally(self) -> str:
        counts = self.counts()
        return f"{counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} skipped"

    def progress_line(self, record: JobRecord) -> str:
        meta, counts = self.meta, self.counts()
        total, done = int(meta["total"]) or record.num + 1, sum(counts.values()) - counts["paused"]
        elapsed = time.time() - float(meta["started"])
        eta = elapsed / max(done, 1) * max(total - done, 0)
        result = {"FAILED": record.reason, "PAUSED": "paused at its rung's budget"}.get(
            record.status, f"test/acc={record.test_acc:.4f}"
        )
        tally = self.tally()
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


def resume_command(args: list[str]) -> str:
    """The command that resumes an interrupted sweep: the same one, with resume on (the default)."""
    kept = [a for a in args if not a.startswith("tracking.resume=")]
    return shlex.join(["transferlab", "train", *kept])


def print_interrupted(ledger: SweepLedger | None, args: list[str]) -> None:
    """On Ctrl-C: what finished, and the exact command that resumes."""
    if ledger is not None:
        counts = ledger.counts()
        done = f"{counts['finished']} of {ledger.meta['total']} jobs finished ({counts['failed']} failed, "
        done += f"{counts['skipped']} skipped)"
    else:
        done = "the job did not finish"
    print(f"\ninterrupted: {done}; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
