"""Why a job failed, in one line: the failure reason, the NaN guard, the status a run ends with.

A job that raises is recorded (FAILED run, traceback artifact, one-line reason tag); the sweep's
task body (jobs.task) decides whether the sweep goes on.
"""

from __future__ import annotations

import traceback

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from transferlab import tags
from transferlab.errors import TransferlabError

REASON_TAG = tags.FAILURE


def failure_reason(err: BaseException) -> str:
    """One line naming what went wrong and, where known, what to change."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "CUDA out of memory: lower data.batch_size or use a smaller backbone"
    if isinstance(err, SIGTERMException):
        return "terminated (SIGTERM)"
    if interrupted(err):
        return "interrupted (Ctrl-C)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:500] if first else type(err).__name__


class NonFiniteLoss(TransferlabError):
    """The training loss became NaN or infinite."""


class FailOnNonFiniteLoss(pl.Callback):
    """Fail the job at the first NaN/inf loss instead of training on garbage for hours.

    Reading a GPU value on the host waits for every queued kernel, so a check each step would
    stall the step queue: on an accelerator the first bad batch and its loss are recorded on the
    device and read every `every` steps and at each epoch's last batch (before its validation).
    On the CPU nothing is queued, so it reads every step. The error names the first bad batch."""

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self._first: torch.Tensor | None = None  # on the device: [batch index or -1, its loss]

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach().float().reshape(())
        every = self.every or (1 if loss.device.type == "cpu" else 50)
        if every == 1:
            if not bool(torch.isfinite(loss)):
                self._fail(trainer, module, batch_idx, float(loss))
            return
        first = self._first if self._first is not None else torch.full((2,), -1.0, device=loss.device)
        record = ~torch.isfinite(loss) & (first[0] < 0)
        self._first = torch.where(record, torch.stack([torch.full_like(loss, batch_idx), loss]), first)
        if (batch_idx + 1) % every == 0 or batch_idx + 1 >= trainer.num_training_batches:
            bad_batch, bad_loss = self._first.tolist()  # the one read back
            self._first = None
            if bad_batch >= 0:
                self._fail(trainer, module, int(bad_batch), bad_loss)

    @staticmethod
    def _fail(trainer: pl.Trainer, module: pl.LightningModule, batch_idx: int, loss: float) -> None:
        epoch = getattr(module, "epoch_offset", 0) + trainer.current_epoch
        raise NonFiniteLoss(
            f"training loss is {loss} at epoch {epoch}, batch {batch_idx}: lower optim.lr or check the data"
        )


def report_failure(err: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for a job's MLflow run that ended with `err`."""
    status = "KILLED" if interrupted(err) else "FAILED"
    return status, failure_reason(err)


def interrupted(err: BaseException) -> bool:
    """Ctrl-C or SIGTERM: the job was stopped, not broken, so it keeps its resume state. Lightning
    turns Ctrl-C inside a fit into `SystemExit(1)` raised while handling the KeyboardInterrupt."""
    return isinstance(err, KeyboardInterrupt | SIGTERMException) or (
        isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt)
    )


def format_traceback(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))
