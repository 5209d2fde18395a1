"""The sweep directory's record of jobs: one line per job, the summary, the resume command.

Each job leaves a small JSON record in the sweep directory, so the per-job line and the summary
work the same whether jobs run in this process (basic), in workers (joblib) or on other hosts
(submitit). The counter's rule: `[job k/N]` numbers launches, and N is how many launches the sweep
makes: the grid's size, or under halving the launches of every rung, re-planned before each rung
(which the line names: `[job k/N rung r/R]`).
"""

from __future__ import annotations

import json
import math
import os
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


# Record file -> (its inode, mtime and size; the record) already read by this process: a job line
# reads only new or rewritten records, so its cost does not grow with the sweep (a 1,000-job sweep
# would otherwise read 1,000 files per line).
_read: dict[str, tuple[tuple[int, int, int], JobRecord]] = {}


class SweepLedger:
    """The sweep directory's record of jobs: total, start time, one JSON file per ended job."""

    def __init__(self, sweep_dir: Path | str) -> None:
        self.dir = Path(sweep_dir) / RECORDS_DIR

    def begin(self, total: int, swept: list[str]) -> None:
        self._write_meta({"total": total, "swept": swept, "started": time.time()})

    def plan_rung(self, total: int, rung: int, rungs: int, first: int) -> None:
        """A halving sweep before each rung: `total` launches in all (re-planned from the
        configurations still alive); this rung's jobs are numbered from `first`."""
        meta = self.meta
        meta["total"] = total
        meta["rungs"] = [*meta.get("rungs", []), [first, rung, rungs]]
        self._write_meta(meta)

    def _write_meta(self, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".sweep.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.dir / "sweep.json")  # atomic: workers read it while the sweep re-plans

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
        if not self.dir.is_dir():
            return []
        found = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if not (entry.name[:1].isdigit() and entry.name.endswith(".json")):
                    continue
                stat = entry.stat()
                stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                seen = _read.get(entry.path)
                if seen is None or seen[0] != stamp:
                    seen = _read[entry.path] = (stamp, JobRecord(**json.loads(Path(entry.path).read_text())))
                found.append(seen[1])
        return sorted(found, key=lambda r: r.num)

    def counts(self, records: list[JobRecord] | None = None) -> dict[str, int]:
        records = self.records() if records is None else records
        return {s.lower(): sum(r.status == s for r in records) for s in ("FINISHED", "FAILED", "SKIPPED", "PAUSED")}

    def tally(self, counts: dict[str, int] | None = None) -> str:
        counts = counts or self.counts()
        line = f"{counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} skipped"
        return f"{line}, {counts['paused']} paused at a rung" if counts["paused"] else line

    def progress_line(self, record: JobRecord) -> str:
        """`[job k/N] ...`: k numbers the launch, N the launches the sweep makes (every ended
        launch counts as done, a rung's paused job too); under halving the rung is named."""
        meta, counts = self.meta, self.counts()
        total, done = int(meta["total"]) or record.num + 1, sum(counts.values())
        elapsed = time.time() - float(meta["started"])
        eta = elapsed / max(done, 1) * max(total - done, 0)
        result = {"FAILED": record.reason, "PAUSED": "paused at its rung's budget"}.get(
            record.status, f"test/acc={record.test_acc:.4f}"
        )
        return (
            f"[job {record.num + 1}/{total}{_rung(meta, record.num)}] {record.status} "
            f"{record.overrides or '(no overrides)'} | {result} | {record.seconds:.1f}s | run {record.run_id or '-'} | "
            f"{self.tally(counts)} | elapsed {_clock(elapsed)} ETA {_clock(eta)}"
        )

    def summary_line(self, study: str) -> str:
        records = self.records()
        failed = "; ".join(f"{r.overrides} ({r.reason})" for r in records if r.status == "FAILED")
        elapsed = time.time() - float(self.meta["started"])
        line = f"sweep {study}: {self.tally(self.counts(records))} of {self.meta['total']} in {_clock(elapsed)}"
        return f"{line}; failed: {failed}" if failed else line


def _rung(meta: dict, num: int) -> str:
    """` rung r/R` for a halving sweep's job number `num` (the last rung planned at or before it)."""
    starts = [(first, rung, rungs) for first, rung, rungs in meta.get("rungs", []) if first <= num]
    if not starts:
        return ""
    _, rung, rungs = max(starts)
    return f" rung {rung}/{rungs}"


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
