"""What the terminal shows: the verbosity switch, a sweep's live progress line, long steps.

By default a sweep shows one live progress line (jobs done, failed, skipped, ETA) and one result
line per job; each job's own output (epoch lines, library notices, warnings) goes to `job.log` in
its Hydra output folder. `transferlab train -v` or `TRANSFERLAB_VERBOSE=1` streams all of it.
When the output is not a terminal nothing is redrawn: plain lines only.
Imports nothing heavy: the CLI answers `--help` and config errors without torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

VERBOSE_ENV = "TRANSFERLAB_VERBOSE"
# Libraries whose INFO lines (timm's "Loaded ... from checkpoint", MLflow's "Creating initial
# MLflow database tables", Hydra's "#3 : overrides") are shown only when verbose.
NOISY_LOGGERS = ("timm", "mlflow", "alembic", "hydra", "hydra_plugins", "pytorch_lightning", "lightning")

_bar: Any = None  # the running sweep's tqdm bar, in the process that runs its jobs (basic launcher)
_terminal: TextIO | None = None  # where the bar and long-step notes go while a job's output is captured


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_verbose(on: bool) -> None:
    """For this process and the jobs it launches (joblib, submitit and Ray workers read the env)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def quiet_libraries() -> None:
    """Unless verbose: the noisy libraries log warnings and errors only, and console handlers
    show no INFO (file handlers, such as Hydra's per-job log, keep it). Verbose undoes both."""
    level = logging.NOTSET if verbose() else logging.WARNING
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in logger.handlers:  # e.g. mlflow's own stderr handler
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(level)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)


def start_sweep(label: str, total: int, live: bool = True) -> None:
    """The live progress line of a sweep, on a terminal only (else the job lines are the progress);
    `live=False` where the jobs run in other processes, which cannot move this line."""
    global _bar, _terminal
    close_sweep()
    _terminal = sys.stderr
    if verbose() or not live or not interactive(sys.stderr):
        return
    from tqdm import tqdm

    _bar = tqdm(total=total, desc=label, unit="job", file=sys.stderr, dynamic_ncols=True, leave=True)


def sweep_total(total: int) -> None:
    """The sweep re-planned how many jobs it launches (halving, before each rung)."""
    if _bar is not None:
        _bar.total = total
        _bar.refresh()


def sweep_job_started(what: str) -> None:
    if _bar is not None:
        _bar.set_postfix_str(what[:80], refresh=True)


def sweep_job_ended(tally: str) -> None:
    if _bar is not None:
        _bar.set_postfix_str(tally, refresh=False)
        _bar.update(1)


def note(what: str) -> None:
    """A long step inside a sweep job whose output is captured (pretraining a source, training a
    teacher): the live line names it, or without one a plain line reaches the terminal. Outside
    a sweep the step prints its own lines."""
    if _bar is not None:
        _bar.set_postfix_str(what[:80], refresh=True)
    elif _terminal is not None and _terminal is not sys.stdout and _terminal is not sys.stderr:
        print(what, file=_terminal, flush=True)


def result_line(line: str) -> None:
    """One job's result: above the live line when there is one, else a plain line."""
    if _bar is not None:
        _bar.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


def close_sweep() -> None:
    global _bar, _terminal
    if _bar is not None:
        _bar.close()
    _bar, _terminal = None, None


@contextlib.contextmanager
def captured(path: os.PathLike | str | None) -> Iterator[None]:
    """A sweep job's stdout and stderr go to `path` unless verbose (or no path): the sweep's
    terminal shows one line per job, and the job's epoch lines and warnings stay in its log."""
    if path is None or verbose():
        yield
        return
    global _terminal
    outer = _terminal
    _terminal = outer or sys.stderr
    with (
        open(path, "a", encoding="utf-8", buffering=1) as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            yield
        finally:
            _terminal = outer


@contextlib.contextmanager
def step(what: str, total: int | None = None, min_seconds: float = 0.0) -> Iterator[Callable[[int], None]]:
    """A long step (decoding a store, building a feature cache, pretraining a source): a transient
    bar (or the sweep line's postfix) on a terminal; otherwise one line before and one after,
    printed only when the step takes longer than `min_seconds` (the "after" line) -> advance(n)."""
    start = time.perf_counter()
    terminal = _terminal or sys.stderr
    bar = None
    if _bar is not None:
        _bar.set_postfix_str(what[:80], refresh=True)
    elif interactive(terminal) and not verbose():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=what, file=terminal, leave=False, dynamic_ncols=True, mininterval=0.5)
    elif min_seconds <= 0:
        print(f"{what} ...", flush=True)
    done = [0]

    def advance(n: int = 1) -> None:
        done[0] += n
        if bar is not None:
            bar.update(n)
        elif _bar is not None and total:
            _bar.set_postfix_str(f"{what[:60]} {100 * done[0] // total}%", refresh=False)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        if bar is None and _bar is None and seconds >= min_seconds:
            print(f"{what}: done in {seconds:.1f}s", flush=True)
