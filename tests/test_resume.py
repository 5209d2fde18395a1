"""The resume state within a phase: saved at most every `tracking.save_every_s`, and a job stopped
between two saves still resumes into its run and ends with the metrics of an uninterrupted one."""

from __future__ import annotations

import time
from types import SimpleNamespace

import mlflow
import pytest
from pytorch_lightning.utilities.exceptions import SIGTERMException

from conftest import FAST
from transferlab.config import compose_config
from transferlab.jobs.resume import EpochCheckpoint
from transferlab.jobs.run import run
from transferlab.tracking.run import EpochLogger

# Two phases: the head (epoch 0), then everything (epochs 1-3, phase-local 0-2).
JOB = [*FAST, "finetune=head_then_all", "finetune.head_epochs=1", "trainer.max_epochs=4"]


def _trainer(epoch: int, max_epochs: int = 5, sigterm: bool = False) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, received_sigterm=sigterm)


def test_a_save_is_due_after_the_interval_at_a_sigterm_and_at_a_rungs_last_epoch(tmp_path) -> None:
    saver = EpochCheckpoint(tmp_path / "last.ckpt", timer=None, every_s=10.0)
    saver._saved_at = time.perf_counter()
    assert not saver._due(_trainer(0))
    assert saver._due(_trainer(0, sigterm=True))  # the epoch that was ending when SIGTERM came
    saver._saved_at -= 11
    assert saver._due(_trainer(0))
    rung = EpochCheckpoint(tmp_path / "last.ckpt", timer=None, every_s=3600.0, final=True)
    assert not rung._due(_trainer(3))
    assert rung._due(_trainer(4))  # the fit's last epoch: the next rung continues from it
    assert EpochCheckpoint(tmp_path / "last.ckpt", timer=None)._due(_trainer(0))  # 0: every epoch


def _saves(monkeypatch) -> list[int]:
    saved: list[int] = []
    real = EpochCheckpoint.on_train_epoch_end

    def counted(self, trainer, module):
        before = self.saves
        real(self, trainer, module)
        saved.extend([module.epoch_offset + trainer.current_epoch] * (self.saves - before))

    monkeypatch.setattr(EpochCheckpoint, "on_train_epoch_end", counted)
    return saved


@pytest.mark.parametrize(("every_s", "saved_epochs"), [(0, [0, 1, 2, 3]), (3600, [])])
def test_epoch_saves_follow_the_interval(store, monkeypatch, every_s, saved_epochs) -> None:
    saved = _saves(monkeypatch)
    run(compose_config([*JOB, f"study=every{every_s}", f"tracking.save_every_s={every_s}"]))
    assert saved == saved_epochs


def test_a_job_stopped_between_saves_resumes_from_the_last_one_with_identical_metrics(store, monkeypatch) -> None:
    """SIGTERM at the end of epoch 2; the last save was after epoch 1 (the interval skipped epoch 2):
    the rerun continues the same run from epoch 1, retrains epoch 2 and ends as a straight run."""
    job = [*JOB, "tracking.save_every_s=3600"]
    saved = _saves(monkeypatch)
    real_due = EpochCheckpoint._due
    monkeypatch.setattr(EpochCheckpoint, "_due", lambda self, t: t.current_epoch == 0 or real_due(self, t))
    trained: list[int] = []
    real_log = EpochLogger.on_train_epoch_end

    def log_then_stop(self, trainer, module):
        epoch = module.epoch_offset + trainer.current_epoch
        trained.append(epoch)
        real_log(self, trainer, module)
        if epoch == 2 and "killed" in self.tracker.cfg.experiment and len(trained) == 3:
            raise SIGTERMException  # as Lightning raises it after a SIGTERM

    monkeypatch.setattr(EpochLogger, "on_train_epoch_end", log_then_stop)
    with pytest.raises(SIGTERMException):
        run(compose_config([*job, "study=killed"]))
    assert saved == [0, 1]  # each phase's first epoch (patched), nothing after: epoch 2 was not saved
    client = mlflow.MlflowClient(store)
    (stopped,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert stopped.info.status == "KILLED"  # stopped, not failed: its resume state is kept
    # what it logged, deferred writes included, landed when it ended (the rerun logs epoch 2 again)
    assert sorted(m.step for m in client.get_metric_history(stopped.info.run_id, "train/loss")) == [0, 1, 2]

    trained.clear()
    resumed = run(compose_config([*job, "study=killed"]))
    assert trained == [2, 3]  # from the save after epoch 1, not from the start
    straight = run(compose_config([*job, "study=straight"]))
    for key in ("test/acc", "test/loss", "test/f1", "compute/epochs", "compute/train_samples"):
        assert resumed[key] == straight[key], key
    (after,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert after.info.run_id == stopped.info.run_id
    assert after.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(after.info.run_id, "train/loss")}) == [0, 1, 2, 3]
