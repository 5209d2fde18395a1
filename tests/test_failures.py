"""Execution helpers: failure reasons, the NaN guard, job lines, UI links, the resume command."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from transferlab.jobs.failures import FailOnNonFiniteLoss, NonFiniteLoss, failure_reason, report_failure
from transferlab.jobs.ledger import JobRecord, SweepLedger, print_interrupted, resume_command
from transferlab.tracking.links import ui_url


def test_failure_reason_is_one_line() -> None:
    assert failure_reason(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert failure_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ...")).startswith(
        "CUDA out of memory: lower data.batch_size"
    )
    assert failure_reason(KeyboardInterrupt()) == "interrupted (Ctrl-C)"
    assert failure_reason(RuntimeError()) == "RuntimeError"


def test_ctrl_c_and_sigterm_inside_a_fit_mark_the_job_killed_not_failed() -> None:
    """Lightning turns Ctrl-C in a fit into SystemExit(1) and SIGTERM into SIGTERMException: a
    KILLED job keeps its resume state, a FAILED one reruns from scratch."""
    ctrl_c = SystemExit(1)
    ctrl_c.__context__ = KeyboardInterrupt()  # raised inside `except KeyboardInterrupt` (trainer/call.py)
    assert report_failure(ctrl_c) == ("KILLED", "interrupted (Ctrl-C)")
    assert report_failure(SIGTERMException()) == ("KILLED", "terminated (SIGTERM)")
    assert report_failure(SystemExit(2))[0] == "FAILED"
    assert report_failure(ValueError("x"))[0] == "FAILED"


class _Trainer:
    current_epoch = 3
    num_training_batches = 20


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_fails_the_job(bad: float) -> None:
    guard = FailOnNonFiniteLoss()
    guard.on_train_batch_end(_Trainer(), torch.nn.Linear(1, 1), {"loss": torch.tensor(0.5)}, None, 0)
    with pytest.raises(NonFiniteLoss, match="at epoch 3, batch 7: lower optim.lr"):
        guard.on_train_batch_end(_Trainer(), torch.nn.Linear(1, 1), {"loss": torch.tensor(bad)}, None, 7)


def test_a_deferred_check_names_the_first_bad_batch_when_it_reads_back() -> None:
    # What an accelerator runs (every 50 steps there): no host read until the check's step.
    guard, net, losses = FailOnNonFiniteLoss(every=5), torch.nn.Linear(1, 1), [0.5, 0.4, math.nan, 0.3, math.inf]
    for i, loss in enumerate(losses[:4]):
        guard.on_train_batch_end(_Trainer(), net, {"loss": torch.tensor(loss)}, None, i)  # not yet read
    with pytest.raises(NonFiniteLoss, match="training loss is nan at epoch 3, batch 2: lower optim.lr"):
        guard.on_train_batch_end(_Trainer(), net, {"loss": torch.tensor(losses[4])}, None, 4)
    clean = FailOnNonFiniteLoss(every=5)
    for i in range(10):  # finite losses pass every check
        clean.on_train_batch_end(_Trainer(), net, {"loss": torch.tensor(1.0 / (i + 1))}, None, i)
    late = FailOnNonFiniteLoss(every=50)
    late.on_train_batch_end(_Trainer(), net, {"loss": torch.tensor(math.inf)}, None, 18)
    with pytest.raises(NonFiniteLoss, match="is inf at epoch 3, batch 18"):  # the epoch's last batch reads
        late.on_train_batch_end(_Trainer(), net, {"loss": torch.tensor(0.1)}, None, 19)


def test_ui_links_open_the_runs_view() -> None:
    # MLflow 3's UI is a hash router; without workflowType it opens on the GenAI overview.
    assert (
        ui_url("3")
        == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=transferlab"
    )
    assert ui_url("3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_url("3", "abc", "http://mlflow.lab:8080/").startswith("http://mlflow.lab:8080/#/experiments/3/runs/abc?")


def test_resume_command_repeats_the_sweep_with_resume_on() -> None:
    args = ["-m", "experiment=default", "tracking.resume=false", "data.name=my data"]
    assert resume_command(args) == "transferlab train -m experiment=default 'data.name=my data'"


def test_ledger_counts_lines_and_summary(tmp_path) -> None:
    ledger = SweepLedger(tmp_path)
    ledger.begin(4, ["seed"])
    assert ledger.varying(["data=digits", "seed=1"]) == "seed=1"
    ledger.add(JobRecord(0, "FINISHED", "seed=0", 2.0, "r0", 0.5))
    ledger.add(JobRecord(1, "FAILED", "seed=1", 1.0, "r1", reason="ValueError: x"))
    line = ledger.progress_line(JobRecord(2, "SKIPPED", "seed=2", 0.1, "r2", 0.75))
    ledger.add(JobRecord(2, "SKIPPED", "seed=2", 0.1, "r2", 0.75))
    assert line.startswith("[job 3/4] SKIPPED seed=2 | test/acc=0.7500 | 0.1s | run r2 | ")
    assert "1 finished, 1 failed, 1 skipped" in ledger.progress_line(JobRecord(2, "SKIPPED", "seed=2", 0.1, "r2"))
    assert ledger.counts() == {"finished": 1, "failed": 1, "skipped": 1, "paused": 0}
    summary = ledger.summary_line("s")
    assert summary.startswith("sweep s: 1 finished, 1 failed, 1 skipped of 4 in ")
    assert summary.endswith("failed: seed=1 (ValueError: x)")


def test_ctrl_c_says_what_finished_and_how_to_resume(tmp_path, capsys) -> None:
    ledger = SweepLedger(tmp_path)
    ledger.begin(4, ["seed"])
    ledger.add(JobRecord(0, "FINISHED", "seed=0", 2.0, "r0", 0.5))
    ledger.add(JobRecord(1, "SKIPPED", "seed=1", 0.1, "r1", 0.5))
    print_interrupted(ledger, ["-m", "experiment=default", "seed=0,1,2,3"])
    err = capsys.readouterr().err.strip()
    assert err == (
        "interrupted: 1 of 4 jobs finished (0 failed, 1 skipped); "
        "resume with: transferlab train -m experiment=default seed=0,1,2,3"
    )


def test_a_paused_halving_job_is_not_counted_finished(tmp_path) -> None:
    ledger = SweepLedger(tmp_path)
    ledger.begin(2, ["seed"])
    ledger.add(JobRecord(0, "PAUSED", "seed=0", 1.0, run_id="r0"))
    line = ledger.progress_line(JobRecord(0, "PAUSED", "seed=0", 1.0, run_id="r0"))
    assert "PAUSED seed=0 | paused at its rung's budget" in line
    assert "test/acc=nan" not in line
    assert ledger.counts() == {"finished": 0, "failed": 0, "skipped": 0, "paused": 1}


def test_a_rewritten_record_is_read_again(tmp_path) -> None:
    """Records already read are kept per process; a record written again (a resumed sweep's job
    with the same number) is read again."""
    ledger = SweepLedger(tmp_path)
    ledger.begin(2, ["seed"])
    ledger.add(JobRecord(0, "PAUSED", "seed=0", 1.0, run_id="r0"))
    assert [r.status for r in ledger.records()] == ["PAUSED"]
    ledger.add(JobRecord(0, "FINISHED", "seed=0", 2.0, run_id="r0", test_acc=0.5))
    ledger.add(JobRecord(1, "FAILED", "seed=1", 1.0, reason="x"))
    assert [(r.status, r.test_acc) for r in SweepLedger(tmp_path).records()][0] == ("FINISHED", 0.5)
    assert SweepLedger(tmp_path).counts() == {"finished": 1, "failed": 1, "skipped": 0, "paused": 0}
