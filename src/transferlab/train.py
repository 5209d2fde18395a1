"""run(cfg) -> metrics: build data, model and tracker, fit phase by phase, test, log compute."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.plugins.environments import SLURMEnvironment
from safetensors.torch import save_file

from transferlab import speed, wise
from transferlab.compute import (
    FitTimer,
    forward_flops,
    layer_costs,
    peak_memory_mb,
    reset_peak_memory,
    trainable_params,
    training_flops_per_sample,
)
from transferlab.config import validate
from transferlab.data import build_datamodule
from transferlab.execution import REASON_TAG, FailOnNonFiniteLoss, format_traceback, report_failure
from transferlab.features import PhaseFeatures
from transferlab.finetune import BestWeights, Phase, plan_phases, target_trainable
from transferlab.identity import condition_hash, config_hash, flatten, hydra_run, job_run_name
from transferlab.model import TransferModule
from transferlab.parallel import assigned_devices
from transferlab.probes import check_devices, check_store
from transferlab.resume import EpochCheckpoint, JobCheckpoint, job_checkpoint, resumable_run
from transferlab.routes import build_module, route_for
from transferlab.stages import format_table, stage_table
from transferlab.sweep import SWEPT_ENV, parent_run_id
from transferlab.tracking import EpochLogger, RunTracker, finished_run, tracking_uri
from transferlab.weights import create_backbone, input_spec


def run(
    cfg: DictConfig,
    *,
    role: str = "job",
    backbone_out: Path | None = None,
    extra_tags: dict[str, str] | None = None,
    run_name: str | None = None,
) -> dict[str, float]:
    """Train and test one job; every result lands in one MLflow run (marked FAILED on error)."""
    validate(cfg)
    check_devices(cfg.trainer)
    check_store(tracking_uri(cfg.tracking))  # seconds, not minutes of MLflow retries; before any data
    if cfg.tracking.resume and (done := finished_run(cfg.tracking, config_hash(cfg))):
        print(f"skipped: this exact job already finished as MLflow run {done.info.run_id}", flush=True)
        return dict(done.data.metrics)
    from transferlab.pretrain import resolve_checkpoint  # may train the source model first

    checkpoint, source_tags = resolve_checkpoint(cfg)
    tracker = RunTracker(cfg.tracking)
    job = job_checkpoint(cfg, config_hash(cfg), role)
    tags = {
        "transferlab.role": role,
        "transferlab.config_hash": config_hash(cfg),
        "transferlab.condition_hash": condition_hash(cfg),
        "transferlab.seed": str(cfg.seed),
        **source_tags,
        **(extra_tags or {}),
    }
    if resumed := resumable_run(job, cfg.tracking, tags["transferlab.config_hash"]):
        tracker.attach(resumed)
        if role == "job" and (parent := parent_run_id()):
            tracker.set_tags({"mlflow.parentRunId": parent})  # it finishes under this sweep
        print(f"resuming MLflow run {resumed} from {job.dir}", flush=True)
    else:
        if tracker.enabled and job.enabled:
            job.discard()  # a stale state whose run is gone or finished
        tracker.start(run_name or _run_name(cfg), tags, parent_run_id() if role == "job" else None)
        job.bind(tracker.run_id)
    try:
        if not resumed:
            # The config goes in first, so a run that fails later still says what it was.
            tracker.log_params(flatten(cfg) | _hydra_overrides())
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        metrics = _fit_and_test(cfg, tracker, checkpoint, backbone_out, job)
    except BaseException as err:
        status, reason = report_failure(err)
        with contextlib.suppress(Exception):  # the store or disk that failed the job may refuse these too
            tracker.set_tags({REASON_TAG: reason})
            tracker.log_text(format_traceback(err), "error/traceback.txt")
        tracker.end(status)
        if status == "FAILED" and tracker.enabled and job.enabled:
            job.discard()  # a job that raised reruns from scratch; only killed ones resume
        raise
    tracker.end()
    if tracker.enabled and job.enabled:
        job.discard()  # finished: its checkpoints are no longer needed
    return metrics


def _run_name(cfg: DictConfig) -> str:
    """identity.job_run_name with the keys this sweep varies (an experiment's grid, command-line sweeps)."""
    varied = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    if (hc := hydra_run()) is not None:
        varied += [k for k in hc.sweeper.get("params") or {} if k not in varied]
    return job_run_name(cfg, varied)


def _fit_and_test(
    cfg: DictConfig, tracker: RunTracker, checkpoint: Path | None, backbone_out: Path | None, job: JobCheckpoint
) -> dict[str, float]:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    reset_peak_memory()  # this job's peak, not the process's (sweeps run many jobs per process)
    backbone = create_backbone(cfg.backbone, checkpoint)
    spec = input_spec(backbone.model, cfg.backbone)
    data = build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=cfg.cache_dir)
    module, route_tags = build_module(cfg, backbone.model, spec, data.num_classes)
    speed.apply_speedups(module, data, cfg.trainer)
    stages = module.stages
    target = target_trainable(cfg.finetune, stages, module.kept)
    epochs = _epochs(cfg.trainer, len(data.train_dataloader()))
    val_every = max(1, epochs // int(cfg.trainer.max_epochs))  # also the small-data epoch scale
    phases = plan_phases(cfg.finetune, epochs, target, scale=val_every)

    tracker.set_tags({f"transferlab.backbone.{k}": v for k, v in backbone.tags.items()} | route_tags)
    tracker.log_text(format_table(stage_table(module.backbone, stages, spec.size, set(target))), "stages.md")
    _log_hydra_dir(tracker)
    counts = {k: v for k, v in data.count_metrics().items() if k.endswith("_size")}
    tracker.log_metrics(counts)  # per-class counts go in classes.json: as metrics they bury test/acc
    tracker.log_text(data.class_table(), "classes.json")
    tracker.set_tags(
        {
            "transferlab.subset_hash": data.subset_hash,
            "transferlab.skipped_files": str(data.skipped),
        }
    )

    costs = layer_costs(module, torch.zeros(1, spec.in_chans, spec.size, spec.size))
    features = PhaseFeatures(cfg, module, data, costs)
    tracker.set_tags({"transferlab.cache_features": features.mode})
    start = wise.snapshot(module) if cfg.finetune.wise_alphas else None
    timer = FitTimer()
    trainer, epoch, carried, train_flops, eval_flops, unfrozen = None, 0, 0, 0.0, 0.0, set()
    module.total_epochs, module.epoch_scale = epochs, val_every
    best_epochs: dict[str, float] = {}
    done = job.phases_done() or {"phases": 0}
    if done["phases"]:  # a killed run finished these phases: their weights and counters
        for phase in phases[: done["phases"]]:
            module.set_trainable(phase.trainable)
        job.load_phase_weights(module)
        epoch, carried, per_sample = done["epoch"], done["carried"], done["per_sample"]
        train_flops, eval_flops, unfrozen = done["train_flops"], done["eval_flops"], set(done["unfrozen"])
        timer.seconds, timer.samples, timer.eval_samples = done["seconds"], done["samples"], done["eval_samples"]
        best_epochs = done["best_epochs"]
    for k, phase in enumerate(phases):
        if k < done["phases"]:
            continue
        module.set_trainable(phase.trainable)
        module.epoch_offset = data.epoch_offset = epoch
        tracker.log_metrics({f"unfrozen_at/{stages.names[s]}": epoch for s in phase.trainable - unfrozen}, step=epoch)
        unfrozen |= phase.trainable
        best = BestWeights(str(cfg.finetune.select))
        callbacks = [EpochLogger(tracker), timer, best]
        if job.enabled:
            callbacks.append(EpochCheckpoint(job.epoch_checkpoint(k), timer))
        trainer = _trainer(cfg.trainer, phase, phase.epochs + carried, val_every, callbacks, job.dir)
        seen, evaluated = timer.samples, timer.eval_samples  # at the phase's start (restored on a resume)
        fit_data = features.datamodule(phase.name, phase.trainable, trainer)
        trainer.fit(module, datamodule=fit_data, ckpt_path=job.resume_path(k))
        ran = trainer.current_epoch
        if best.best_epoch is not None:  # the phase ended on these weights (select=best)
            best_epochs[f"best_epoch/{phase.name}"] = epoch + best.best_epoch
        carried = phase.epochs + carried - ran
        epoch += ran
        per_sample = training_flops_per_sample(module, features.train_costs()) + module.teacher_flops_per_sample
        phase_samples = (timer.samples - seen) * trainer.world_size
        train_flops += per_sample * phase_samples
        # validation forward passes, on cached features where this phase used them
        eval_flops += forward_flops(features.train_costs()) * (timer.eval_samples - evaluated) * trainer.world_size
        tracker.log_metrics(
            {
                f"compute/{phase.name}_flops_per_sample": per_sample,
                f"compute/{phase.name}_flops": per_sample * phase_samples,
                f"compute/{phase.name}_samples": phase_samples,
            },
            step=epoch,
        )
        if trainer.world_size > 1:
            tracker.log_metrics({"ddp/param_divergence": _rank_divergence(module)}, step=epoch)
        job.save_phase(
            module,
            {
                "phases": k + 1,
                "epoch": epoch,
                "carried": carried,
                "train_flops": train_flops,
                "eval_flops": eval_flops,
                "per_sample": per_sample,
                "unfrozen": sorted(unfrozen),
                "seconds": timer.seconds,
                "samples": timer.samples,
                "eval_samples": timer.eval_samples,
                "best_epochs": best_epochs,
            },
        )
    if trainer is None:  # killed after the last phase, before the test
        trainer = _trainer(cfg.trainer, phases[-1], 1, val_every, [], job.dir)
        fit_data = features.datamodule(phases[-1].name, phases[-1].trainable, trainer)

    evaluated = timer.eval_samples
    tested = trainer.test(module, datamodule=fit_data, verbose=False)[0]
    eval_flops += forward_flops(features.train_costs()) * (timer.eval_samples - evaluated) * trainer.world_size
    tracker.set_tags(features.tags())
    metrics = {k: float(v) for k, v in tested.items()}
    metrics |= {
        "test/acc_pct": 100 * metrics.get("test/acc", math.nan),  # what the runs table shows
        "compute/train_flops": train_flops,  # every phase
        "compute/train_gflops": train_flops / 1e9,  # readable in the runs table (1.2e+11 is cut off)
        "compute/train_flops_per_sample": train_flops / max(1, timer.samples * trainer.world_size),
        "compute/eval_flops": eval_flops,
        "compute/inference_flops_per_sample": forward_flops(costs),  # the student's alone
        "compute/teacher_flops_per_sample": module.teacher_flops_per_sample,
        "compute/teacher_flops": module.teacher_flops_per_sample * timer.samples * trainer.world_size,
        "compute/teacher_fit_flops": module.teacher_fit_flops,
        "compute/fit_seconds": timer.seconds,
        "compute/train_samples": timer.samples * trainer.world_size,
        "compute/samples_per_second": timer.samples_per_second,
        "compute/device_hours": timer.seconds * trainer.world_size / 3600,
        "compute/trainable_params": float(trainable_params(module)),
        "compute/epochs": float(epoch),
        **{f"compute/{k}": v for k, v in peak_memory_mb().items()},
        **features.metrics(),
        **counts,
    }
    if start is not None:  # WiSE-FT: the best-val interpolation becomes the result and the model
        evaluated = int(counts["data/val_size"] + counts["data/test_size"])
        alphas = list(cfg.finetune.wise_alphas)
        metrics |= wise.wise_metrics(
            module, start, alphas, trainer, fit_data, tracker.log_metrics, forward_flops(costs), evaluated
        )
    tracker.log_metrics(metrics | best_epochs, step=epoch)
    route_for(cfg).finalize(module)
    _save_weights(module, tracker, cfg.tracking.log_model, backbone_out)
    return metrics


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


def _hydra_overrides() -> dict[str, str]:
    hc = hydra_run()  # None: not launched by Hydra (tests, reproduce)
    return {} if hc is None else {"hydra.overrides": " ".join(hc.overrides.task)}


def _log_hydra_dir(tracker: RunTracker) -> None:
    if (hc := hydra_run()) is not None and hc.output_subdir is not None:
        tracker.log_artifact(Path(hc.runtime.output_dir) / hc.output_subdir, "hydra")


def _save_weights(module: TransferModule, tracker: RunTracker, log_model: bool, backbone_out: Path | None) -> None:
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
