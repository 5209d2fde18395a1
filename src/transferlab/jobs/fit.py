"""One job's fit, in named steps: build, log what the job is, the phase loop, the final metrics.

Each phase is its own `Trainer.fit` with a fresh optimizer (transfer.schedule plans them); after each one the
loop's counters (`Progress`) and weights are saved, so a killed job resumes at the phase it was in.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.plugins.environments import SLURMEnvironment
from safetensors.torch import save_file

from transferlab import tags
from transferlab.data import build_datamodule
from transferlab.jobs.failures import FailOnNonFiniteLoss
from transferlab.jobs.parallel import assigned_devices
from transferlab.jobs.resume import EpochCheckpoint, JobCheckpoint
from transferlab.tracking.identity import hydra_run
from transferlab.tracking.run import EpochLogger, RunTracker
from transferlab.transfer import speed, wise
from transferlab.transfer.backbone import create_backbone, input_spec
from transferlab.transfer.compute import (
    FitTimer,
    forward_flops,
    layer_costs,
    peak_memory_mb,
    reset_peak_memory,
    trainable_params,
    training_flops_per_sample,
)
from transferlab.transfer.distill import TeacherWeights
from transferlab.transfer.features import FeatureDataModule, PhaseFeatures
from transferlab.transfer.linear_probe import solve_head
from transferlab.transfer.module import TransferModule
from transferlab.transfer.routes import build_module, route_for
from transferlab.transfer.schedule import BestWeights, Phase, plan_phases, target_trainable
from transferlab.transfer.stages import format_table, stage_table


@dataclass
class Progress:
    """The phase loop's counters: saved after every phase (jobs.resume) and restored by the same
    code, so a killed job resumes with the counts it had. Field names are the stored format."""

    phases: int = 0  # phases finished
    epoch: int = 0
    carried: int = 0  # epochs an early-stopped phase left to the next
    train_flops: float = 0.0
    eval_flops: float = 0.0
    per_sample: float = 0.0
    unfrozen: list[int] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0
    eval_samples: int = 0
    best_epochs: dict[str, float] = field(default_factory=dict)

    def save(self, job: JobCheckpoint, module: TransferModule, timer: FitTimer) -> None:
        self.seconds, self.samples, self.eval_samples = timer.seconds, timer.samples, timer.eval_samples
        job.save_phase(module, asdict(self))

    @classmethod
    def restore(cls, job: JobCheckpoint, module: TransferModule, phases: list[Phase], timer: FitTimer) -> Progress:
        """The counters of a killed run's finished phases, with their weights loaded (or a fresh start)."""
        if not (state := job.phases_done()):
            return cls()
        progress = cls(**state)
        for phase in phases[: progress.phases]:
            module.set_trainable(phase.trainable)
        job.load_phase_weights(module)
        timer.seconds, timer.samples, timer.eval_samples = progress.seconds, progress.samples, progress.eval_samples
        return progress


class BudgetReached(Exception):
    """The fit stopped at `trainer.stop_after_epochs` (a halving sweep's rung): the job's
    checkpoint and MLflow run stay unfinished, so the next rung continues them exactly."""

    def __init__(self, epoch: int, metrics: dict[str, float]) -> None:
        super().__init__(f"stopped after epoch {epoch} (trainer.stop_after_epochs)")
        self.epoch, self.metrics = epoch, metrics


@dataclass
class Job:
    """What `build` makes of a config: the module, its data and the plan of phases."""

    module: TransferModule
    data: pl.LightningDataModule
    phases: list[Phase]
    epochs: int
    val_every: int  # also the small-data epoch scale
    spec: object
    target: list[int]
    backbone_tags: dict[str, str]
    route_tags: dict[str, str]


def fit_and_test(
    cfg: DictConfig,
    tracker: RunTracker,
    checkpoint: Path | None,
    teacher: TeacherWeights | None,
    backbone_out: Path | None,
    job: JobCheckpoint,
) -> dict[str, float]:
    """Build, log what the job is, run the phases, test; -> the job's final metrics."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    reset_peak_memory()  # this job's peak, not the process's (sweeps run many jobs per process)
    built = build(cfg, checkpoint, teacher)
    counts = log_job(cfg, tracker, built)
    module, spec = built.module, built.spec
    costs = layer_costs(module, torch.zeros(1, spec.in_chans, spec.size, spec.size))
    features = PhaseFeatures(cfg, module, built.data, costs)
    tracker.set_tags({tags.CACHE_FEATURES: features.mode}, defer=True)
    start = wise.snapshot(module) if cfg.finetune.wise_alphas else None
    timer = FitTimer()
    progress = Progress.restore(job, module, built.phases, timer)
    trainer, fit_data = fit_phases(cfg, tracker, built, features, timer, progress, job)

    evaluated = timer.eval_samples
    tested = trainer.test(module, datamodule=fit_data, verbose=False)[0]
    progress.eval_flops += forward_flops(features.train_costs()) * (timer.eval_samples - evaluated) * trainer.world_size
    tracker.set_tags(features.tags(), defer=True)
    metrics = final_metrics(tested, progress, timer, trainer, module, costs, features.metrics(), counts)
    if start is not None:  # WiSE-FT: the best-val interpolation becomes the result and the model
        evaluated = int(counts["data/val_size"] + counts["data/test_size"])
        alphas = list(cfg.finetune.wise_alphas)
        metrics |= wise.wise_metrics(
            module, start, alphas, trainer, fit_data, tracker.log_metrics, forward_flops(costs), evaluated
        )
    tracker.log_metrics(metrics | progress.best_epochs, step=progress.epoch, defer=True)  # written by the run's end
    route_for(cfg).finalize(module)
    save_weights(module, tracker, cfg.tracking.log_model, backbone_out)
    return metrics


def build(cfg: DictConfig, checkpoint: Path | None, teacher: TeacherWeights | None) -> Job:
    """Backbone with its weights, data, the route's module, and the phases it will train."""
    backbone = create_backbone(cfg.backbone, checkpoint, cfg.cache_dir)
    spec = input_spec(backbone.model, cfg.backbone, cfg.data)
    data = build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=cfg.cache_dir)
    module, route_tags = build_module(cfg, backbone.model, spec, data.num_classes, teacher)
    speed.apply_speedups(module, data, cfg.trainer)
    target = target_trainable(cfg.finetune, module.stages, module.kept)
    epochs = _epochs(cfg.trainer, len(data.train_dataloader()))
    val_every = max(1, epochs // int(cfg.trainer.max_epochs))
    phases = plan_phases(cfg.finetune, epochs, target, scale=val_every)
    module.total_epochs, module.epoch_scale = epochs, val_every
    return Job(module, data, phases, epochs, val_every, spec, target, backbone.tags, route_tags)


def log_job(cfg: DictConfig, tracker: RunTracker, job: Job) -> dict[str, float]:
    """What the job is: backbone and route tags, its stage table, data sizes and subset; -> the counts.
    Files first, then the tags and counts deferred: they go in one write with the first epochs'."""
    table = stage_table(job.module.backbone, job.module.stages, job.spec.size, set(job.target))
    tracker.log_text(format_table(table), "stages.md")
    if (hc := hydra_run()) is not None and hc.output_subdir is not None:
        tracker.log_artifact(Path(hc.runtime.output_dir) / hc.output_subdir, "hydra")
    tracker.log_text(job.data.class_table(), "classes.json")
    described = {f"{tags.BACKBONE}{k}": v for k, v in job.backbone_tags.items()} | job.route_tags
    described |= {tags.SUBSET_HASH: job.data.subset_hash, tags.SKIPPED_FILES: str(job.data.skipped)}
    if job.module.feature_index is not None:
        described[tags.TRUNCATED_AT] = job.module.stages.names[job.module.kept - 1]
    tracker.set_tags(described, defer=True)
    counts = {k: v for k, v in job.data.count_metrics().items() if k.endswith("_size")}
    tracker.log_metrics(counts, defer=True)  # per-class counts go in classes.json: as metrics they bury test/acc
    return counts


def fit_phases(
    cfg: DictConfig,
    tracker: RunTracker,
    job: Job,
    features: PhaseFeatures,
    timer: FitTimer,
    progress: Progress,
    checkpoints: JobCheckpoint,
) -> tuple[pl.Trainer, pl.LightningDataModule]:
    """Every phase not yet finished, each its own fit; -> the last trainer and its data, for the test."""
    module, stages, data = job.module, job.module.stages, job.data
    trainer, fit_data = None, None
    stop = stop_epoch(cfg.trainer, job)
    for k, phase in enumerate(job.phases):
        if k < progress.phases:
            continue
        if stop is not None and progress.epoch >= stop:  # the budget ended on a phase boundary
            raise BudgetReached(progress.epoch, _partial_compute(progress, timer))
        module.set_trainable(phase.trainable)
        module.epoch_offset = data.epoch_offset = progress.epoch
        unfrozen = {f"unfrozen_at/{stages.names[s]}": progress.epoch for s in phase.trainable - set(progress.unfrozen)}
        tracker.log_metrics(unfrozen, step=progress.epoch, defer=True)
        progress.unfrozen = sorted(set(progress.unfrozen) | phase.trainable)
        best = BestWeights(str(cfg.finetune.select))
        callbacks = [EpochLogger(tracker), timer, best]
        epochs = phase.epochs + progress.carried
        # A rung's budget inside this phase: the same plan (LR schedule, phase lengths), cut short.
        capped = epochs if stop is None else min(epochs, stop - progress.epoch)
        if checkpoints.enabled:  # a rung's stop is always saved: the next rung continues from it
            path, every = checkpoints.epoch_checkpoint(k), tracker.save_every_s
            callbacks.append(EpochCheckpoint(path, timer, every, final=capped < epochs, before_save=tracker.flush))
        trainer = _trainer(cfg.trainer, phase, capped, job.val_every, callbacks, checkpoints.dir)
        seen, evaluated = timer.samples, timer.eval_samples  # at the phase's start (restored on a resume)
        fit_data = features.datamodule(phase.name, phase.trainable, trainer)
        if str(cfg.finetune.head_solver) == "lbfgs" and isinstance(fit_data, FeatureDataModule):
            _solve_head(tracker, module, fit_data, features, progress)
        else:
            trainer.fit(module, datamodule=fit_data, ckpt_path=checkpoints.resume_path(k))
        ran = trainer.current_epoch
        if ran < epochs and ran >= capped and not trainer.should_stop:  # the budget, not early stopping
            _stop_at_budget(tracker, module, features, timer, progress, seen, ran)
        if best.best_epoch is not None:  # the phase ended on these weights (select=best)
            progress.best_epochs[f"best_epoch/{phase.name}"] = progress.epoch + best.best_epoch
        progress.carried = epochs - ran
        progress.epoch += ran
        per_sample = training_flops_per_sample(module, features.train_costs()) + module.teacher_flops_per_sample
        phase_samples = (timer.samples - seen) * trainer.world_size
        progress.per_sample = per_sample
        progress.train_flops += per_sample * phase_samples
        # validation forward passes, on cached features where this phase used them
        evals = (timer.eval_samples - evaluated) * trainer.world_size
        progress.eval_flops += forward_flops(features.train_costs()) * evals
        cost = {"_flops_per_sample": per_sample, "_flops": per_sample * phase_samples, "_samples": phase_samples}
        tracker.log_metrics({f"compute/{phase.name}{k}": v for k, v in cost.items()}, step=progress.epoch, defer=True)
        if trainer.world_size > 1:
            tracker.log_metrics({"ddp/param_divergence": _rank_divergence(module)}, step=progress.epoch, defer=True)
        progress.phases = k + 1
        tracker.flush()  # this phase's metrics land before its end is saved: a resume skips the phase
        progress.save(checkpoints, module, timer)
    if trainer is None:  # killed after the last phase, before the test
        trainer = _trainer(cfg.trainer, job.phases[-1], 1, job.val_every, [], checkpoints.dir)
        fit_data = features.datamodule(job.phases[-1].name, job.phases[-1].trainable, trainer)
    return trainer, fit_data


def stop_epoch(cfg: DictConfig, job: Job) -> int | None:
    """The epoch of the full plan where `trainer.stop_after_epochs` ends this fit (None: at the
    end). It counts configured epochs, so small data sets' extra epochs (min_steps) scale with it."""
    if cfg.get("stop_after_epochs") is None:
        return None
    stop = int(cfg.stop_after_epochs) * job.val_every
    return stop if stop < job.epochs else None


def _stop_at_budget(
    tracker: RunTracker,
    module: TransferModule,
    features: PhaseFeatures,
    timer: FitTimer,
    progress: Progress,
    seen: int,
    ran: int,
) -> None:
    """Log what the fit cost so far (a pruned job keeps these as its totals), then end it."""
    per_sample = training_flops_per_sample(module, features.train_costs()) + module.teacher_flops_per_sample
    flops = progress.train_flops + per_sample * (timer.samples - seen)
    partial = replace(progress, train_flops=flops, epoch=progress.epoch + ran)
    metrics = _partial_compute(partial, timer)
    tracker.log_metrics(metrics, step=partial.epoch)
    raise BudgetReached(partial.epoch, metrics)


def _partial_compute(progress: Progress, timer: FitTimer) -> dict[str, float]:
    return {
        "compute/train_flops": progress.train_flops,
        "compute/train_gflops": progress.train_flops / 1e9,
        "compute/fit_seconds": timer.seconds,
        "compute/epochs": float(progress.epoch),
    }


def _solve_head(
    tracker: RunTracker, module: TransferModule, data: FeatureDataModule, features: PhaseFeatures, progress: Progress
) -> None:
    """A head-only phase on cached features, solved by L-BFGS logistic regression (transfer.linear_probe).
    Its cost: every iteration is a full pass of the head over the train features, forward and backward."""
    fit = solve_head(module.head, data, module.head[-1].out_features)
    samples = len(data.split("train").labels) * fit.iterations
    progress.train_flops += 2 * forward_flops(features.train_costs()) * samples
    tracker.log_metrics(
        {"val/acc": fit.val_acc, "probe/penalty_C": fit.penalty, "probe/iterations": fit.iterations}
        | {"probe/solver_reused": float(fit.reused)}
        | {"compute/probe_solver_seconds": fit.seconds, "compute/probe_solver_samples": samples},
        step=progress.epoch,
    )
    tracker.log_text(json.dumps({str(c): a for c, a in fit.val_acc_by_penalty.items()}, indent=1), "probe_val_acc.json")


def final_metrics(
    tested: dict[str, float],
    progress: Progress,
    timer: FitTimer,
    trainer: pl.Trainer,
    module: TransferModule,
    costs: list,
    feature_metrics: dict[str, float],
    counts: dict[str, float],
) -> dict[str, float]:
    """Test metrics and the job's whole compute: every phase, validation, teacher, memory."""
    metrics = {k: float(v) for k, v in tested.items()}
    world, samples = trainer.world_size, timer.samples * trainer.world_size
    return metrics | {
        "test/acc_pct": 100 * metrics.get("test/acc", math.nan),  # what the runs table shows
        "compute/train_flops": progress.train_flops,  # every phase
        "compute/train_gflops": progress.train_flops / 1e9,  # readable in the runs table (1.2e+11 is cut off)
        "compute/train_flops_per_sample": progress.train_flops / max(1, samples),
        "compute/eval_flops": progress.eval_flops,
        "compute/inference_flops_per_sample": forward_flops(costs),  # the student's alone
        "compute/teacher_flops_per_sample": module.teacher_flops_per_sample,
        "compute/teacher_flops": module.teacher_flops_per_sample * samples,
        "compute/teacher_fit_flops": module.teacher_fit_flops,
        "compute/fit_seconds": timer.seconds,
        "compute/train_samples": samples,
        "compute/samples_per_second": timer.samples_per_second,
        "compute/device_hours": timer.seconds * world / 3600,
        "compute/trainable_params": float(trainable_params(module)),
        "compute/epochs": float(progress.epoch),
        **{f"compute/{k}": v for k, v in peak_memory_mb().items()},
        **feature_metrics,
        **counts,
    }


def _rank_divergence(module: TransferModule) -> float:
    """Spread across ranks of a checksum of all parameters: 0 when DDP kept the replicas equal
    (parameters unfrozen after a DDP wrap silently diverge, Lightning #20340)."""
    import torch.distributed as dist

    # Lightning moves the module to CPU after fit; NCCL gathers only CUDA tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1).to(device)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return float(torch.cat(gathered).max() - torch.cat(gathered).min())


def _epochs(cfg: DictConfig, steps_per_epoch: int) -> int:
    """`max_epochs`, raised so that small data sets still get `min_steps` optimizer steps."""
    return max(int(cfg.max_epochs), math.ceil(int(cfg.min_steps or 0) / max(1, steps_per_epoch)))


def _trainer(cfg: DictConfig, phase: Phase, epochs: int, val_every: int, callbacks: list, root: Path) -> pl.Trainer:
    """One phase's Trainer. `root` is the job's own directory: Lightning on SLURM resumes any
    `hpc_ckpt_*` it finds in `default_root_dir`, which must never be a shared working directory."""
    saver = [c for c in callbacks if isinstance(c, EpochCheckpoint)]  # last: after logging and early stopping
    callbacks = [c for c in callbacks if not isinstance(c, EpochCheckpoint)] + [FailOnNonFiniteLoss()]
    if phase.patience:
        callbacks = [*callbacks, EarlyStopping("val/loss", patience=int(phase.patience))]
    callbacks += saver
    return pl.Trainer(
        max_epochs=epochs,
        accelerator=cfg.accelerator,
        devices=assigned_devices(cfg.devices),  # a parallel job's own GPU slot
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=speed.precision(cfg),
        deterministic=speed.deterministic(cfg),
        fast_dev_run=cfg.fast_dev_run,
        limit_train_batches=cfg.limit_train_batches,
        callbacks=callbacks,
        logger=False,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=sys.stderr.isatty(),  # a per-job bar in a terminal, none in logs
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the datamodule shards whole-batch loaders itself
        # On SLURM the launcher (submitit) requeues; Lightning's requeue would double it (#10601).
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
        check_val_every_n_epoch=val_every,
    )


def save_weights(module: TransferModule, tracker: RunTracker, log_model: bool, backbone_out: Path | None) -> None:
    """Final weights as safetensors: the whole model as an artifact, the (untruncated)
    backbone where a source-model cache wants it."""
    if tracker.run_id is None or not (log_model or backbone_out):
        return
    if backbone_out is not None:
        backbone_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = backbone_out.with_suffix(f".tmp{time.time_ns()}")
        save_file({k: v.contiguous() for k, v in module.backbone.state_dict().items()}, str(tmp))
        tmp.replace(backbone_out)  # atomic: a reader never sees half a file
        (backbone_out.parent / "run.json").write_text(json.dumps({"run_id": tracker.run_id}))
        tracker.log_artifact(backbone_out, "model")
    if log_model:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
            tracker.log_artifact(path, "model")
