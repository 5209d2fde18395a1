"""The job's own tax: one real `transferlab train` job (`jobs.run.run`, MLflow into a fresh SQLite
store) against a hand-written loop over the same data module, model, epochs, validation and test,
and where the difference goes (cumulative seconds inside each named step of the job).

The job runs twice in one process; the second run (new seed, so not skipped; data store, imports
and MLflow migrations already warm) is the one reported, as a sweep's later jobs see it.

Run: `.venv/bin/python benchmarks/bench_job_tax.py` (about 1 min; BENCH_THREADS sets torch's
intra-op threads, default 1); prints a markdown table.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

OVERRIDES = [
    "backbone.weights=scratch",
    "data=digits",
    "data.samples_per_class=40",
    "data.augment=none",
    "trainer.max_epochs=6",
    "trainer.min_steps=0",
    "trainer.accelerator=cpu",
    "finetune=fine_tune",
    "study=tax",
]
spent: dict[str, float] = defaultdict(float)


def timed(owner: object, name: str, label: str) -> None:
    """Wrap `owner.name` so that its calls add their seconds to `spent[label]`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def instrument() -> None:
    import pytorch_lightning as pl

    from transferlab.jobs import fit, resume, run
    from transferlab.tracking import run as tracking
    from transferlab.transfer import schedule

    timed(run, "check_target", "target check (model build, data store, split)")
    timed(run, "finished_job", "skip-if-finished lookup")
    timed(tracking.RunTracker, "start", "MLflow: create the run")
    for method in ("log_params", "log_metrics", "set_tags", "log_text", "log_artifact"):
        timed(tracking.RunTracker, method, "MLflow: params, metrics, tags, texts, artifacts")
    timed(tracking.RunTracker, "end", "MLflow: end the run (flush)")
    timed(fit, "build", "build: backbone, data module, module, phases")
    timed(fit, "layer_costs", "FLOPs counting (FlopCounterMode)")
    timed(fit, "log_job", "log what the job is (stage table, classes, hydra)")
    timed(schedule.BestWeights, "on_validation_end", "best-weights copies")
    timed(schedule.BestWeights, "on_fit_end", "best-weights copies")
    timed(resume.EpochCheckpoint, "on_train_epoch_end", "epoch checkpoints")
    timed(resume.JobCheckpoint, "save_phase", "epoch checkpoints")
    timed(pl.Trainer, "fit", "Trainer.fit (training + validation epochs)")
    timed(pl.Trainer, "test", "test pass")
    timed(fit, "save_weights", "model artifact (safetensors + upload)")


def plain_job(cfg) -> float:
    """A hand-written loop over the job's own data module and a module built the same way:
    the same epochs, AdamW, validation every epoch and one test pass."""
    from transferlab.data import build_datamodule
    from transferlab.transfer.backbone import create_backbone, input_spec
    from transferlab.transfer.module import TransferModule
    from transferlab.transfer.stages import map_stages

    start = time.perf_counter()
    backbone = create_backbone(cfg.backbone)
    spec = input_spec(backbone.model, cfg.backbone)
    data = build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=cfg.cache_dir)
    stages = map_stages(backbone.model)
    module = TransferModule(
        backbone.model, stages, data.num_classes, (3, spec.size, spec.size), cfg.finetune, cfg.optim
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=float(cfg.optim.lr))
    epochs = int(cfg.trainer.max_epochs)
    for _ in range(epochs):
        module.train()
        for x, y in data.train_dataloader():
            loss = torch.nn.functional.cross_entropy(module(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            for x, y in data.val_dataloader():
                module(x)
    with torch.no_grad():
        for x, _ in data.test_dataloader():
            module(x)
    return time.perf_counter() - start


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One intra-op thread by default: on a shared machine two OpenMP threads that wait for each
    # other ran the same epochs 7-14x slower (measured here, 2026-12-01, load average 5-8).
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        from transferlab.config import compose_config
        from transferlab.jobs.run import run

        instrument()
        run(compose_config([*OVERRIDES, "seed=0"]))  # warm: imports, store, MLflow migration
        spent.clear()
        cfg = compose_config([*OVERRIDES, "seed=1"])
        start = time.perf_counter()
        metrics = run(cfg)
        job = time.perf_counter() - start
        parts = dict(spent)
        plain = plain_job(cfg)
    n = int(metrics["data/train_size"])
    print(f"test_resnet 32 px, digits {n} train images, {int(metrics['compute/epochs'])} epochs\n")
    print("| step | seconds | share of the job |\n|---|---|---|")
    print(f"| **whole job** (`run(cfg)`) | {job:.2f} | 100 % |")
    print(f"| hand-written loop, same data, model, epochs, val and test | {plain:.2f} | {100 * plain / job:.0f} % |")
    for label, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds:.2f} | {100 * seconds / job:.0f} % |")
    print(f"\njob / hand-written loop: {job / plain:.2f}x")


if __name__ == "__main__":
    main()
