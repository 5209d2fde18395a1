"""The job's own tax: one real `transferlab train` job (`jobs.run.run`, MLflow into a fresh SQLite
store) against a hand-written loop over the same data module, model, epochs, validation and test,
and where the difference goes (cumulative CPU seconds inside each named step of the job). Whole
jobs get wall and CPU seconds: on a shared machine the CPU seconds of this one-thread process are
the steadier measure (other processes stretch wall time, not the work done).

A first job warms the process (imports, data store, MLflow migration); the timed jobs come after
it (new seeds, so none is skipped), as a sweep's later jobs see them.
The loops run under the job's determinism: Lightning's `deterministic=True` (the CPU default)
turns on `torch.use_deterministic_algorithms` for the process and leaves it on after the warm-up
job (checked; it costs the loop ~2.5 % of its CPU time, 8 alternating pairs, 2026-12-02).

Each round runs the job, the same job saving its resume state after every epoch
(`tracking.save_every_s=0`, what every job did before) and the loop, one after the other, so a
change in the machine's load reaches all three; the table gives medians over rounds.

Two loops, both over the job's own data module and a module built the same way:
- the *bare loop*: one AdamW group, no LR schedule, no metrics; a floor, not what the job computes;
- the *same-work loop*: what the job computes, by hand: the module's per-stage AdamW groups (no
  decay on norms and biases) and its per-step LR schedule, train and val loss and accuracy every
  epoch (torchmetrics), a copy of the best-val-loss weights, and the test pass (accuracy, macro F1)
  on those weights. The job against this loop is the framework's tax: Lightning's loop, MLflow,
  checkpoints, FLOPs counting, checks.

Run: `.venv/bin/python benchmarks/bench_job_tax.py` (about 2 min; BENCH_THREADS sets torch's
intra-op threads, default 1; BENCH_ROUNDS the rounds, default 3; BENCH_BACKBONE=efficientnet_lite0
runs the default study's fine-tune instead: ImageNet Lite0 at 64 px, where a step's compute is
larger); prints a markdown table.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

BACKBONE = os.environ.get("BENCH_BACKBONE")
OVERRIDES = [
    f"backbone={BACKBONE}" if BACKBONE else "backbone.weights=scratch",
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
    """Wrap `owner.name` so that its calls add their CPU seconds to `spent[label]`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.process_time() - start

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


def _built(cfg):
    """(data module, module) built as the job builds them."""
    from transferlab.data import build_datamodule
    from transferlab.transfer.backbone import create_backbone, input_spec
    from transferlab.transfer.module import TransferModule
    from transferlab.transfer.stages import map_stages

    backbone = create_backbone(cfg.backbone)
    spec = input_spec(backbone.model, cfg.backbone, cfg.data)
    data = build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=cfg.cache_dir)
    stages = map_stages(backbone.model)
    module = TransferModule(
        backbone.model, stages, data.num_classes, (3, spec.size, spec.size), cfg.finetune, cfg.optim
    )
    return data, module


def same_work_loop(cfg) -> float:
    """By hand, what the job computes (module docstring); -> test accuracy."""
    from transferlab.transfer.module import OPTIMIZERS
    from transferlab.transfer.schedule import lr_factor

    data, module = _built(cfg)
    module.set_trainable(frozenset(range(module.kept)))  # fine_tune: one phase, every stage
    optimizer = OPTIMIZERS[cfg.optim.name](module.param_groups(), cfg.optim)
    epochs, train = int(cfg.trainer.max_epochs), data.train_dataloader()
    total, warmup = len(train) * epochs, len(train) * int(cfg.optim.warmup_epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.optim.schedule)
    )
    best, best_loss = None, float("inf")
    for _ in range(epochs):
        module.train()
        loss_sum, seen = 0.0, 0
        for x, y in train:
            logits = module(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            module.train_acc.update(logits.detach(), y)
            loss_sum, seen = loss_sum + float(loss.detach()) * len(y), seen + len(y)
        module.train_acc.compute()  # the epoch value, as the job logs it
        module.train_acc.reset()
        module.eval()
        val_loss, seen = 0.0, 0
        with torch.no_grad():
            for x, y in data.val_dataloader():
                logits = module(x)
                val_loss, seen = val_loss + float(torch.nn.functional.cross_entropy(logits, y)) * len(y), seen + len(y)
                module.val_acc.update(logits, y)
        module.val_acc.compute()  # the epoch value, as the job logs it
        module.val_acc.reset()
        if val_loss / seen < best_loss:
            best_loss, best = val_loss / seen, {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(best)
    module.eval()
    with torch.no_grad():
        for x, y in data.test_dataloader():
            logits = module(x)
            module.test_acc.update(logits, y)
            module.test_f1.update(logits, y)
    module.test_f1.compute()
    return float(module.test_acc.compute())


def plain_job(cfg) -> None:
    """A hand-written loop over the job's own data module and a module built the same way:
    the same epochs, AdamW, validation every epoch and one test pass."""
    data, module = _built(cfg)
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


def clocked(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


EVERY_EPOCH = "job, resume state every epoch (`tracking.save_every_s=0`)"
SAME = "same-work loop (param groups, LR schedule, metrics, best weights, test)"
LOOPS = {"loop": plain_job, SAME: same_work_loop}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One intra-op thread by default: on a shared machine two OpenMP threads that wait for each
    # other ran the same epochs 7-14x slower (measured here, 2026-12-01, load average 5-8).
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    arms: dict[str, list[tuple[float, float]]] = {"job": [], EVERY_EPOCH: [], SAME: [], "loop": []}
    parts: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        from transferlab.config import compose_config
        from transferlab.jobs.run import run

        instrument()
        warm = compose_config([*OVERRIDES, "seed=0"])
        if "save_every_s" not in warm.tracking:  # code from before the field (a "before" run)
            del arms[EVERY_EPOCH]
        run(warm)  # warm: imports, store, MLflow migration
        for r in range(rounds):  # alternating, so a change in the machine's load hits every arm
            for arm in arms:
                cfg = compose_config([*OVERRIDES, f"seed={r + 1}"])  # the loop runs the job's data
                if arm == EVERY_EPOCH:  # another seed: `tracking` is not part of a job's identity
                    cfg = compose_config([*OVERRIDES, f"seed={r + 101}", "tracking.save_every_s=0"])
                spent.clear()
                wall, cpu, out = clocked(LOOPS.get(arm, run), cfg)
                arms[arm].append((wall, cpu))
                if arm == "job":
                    metrics = out
                    for label, seconds in spent.items():
                        parts[label] += seconds / rounds
    med = {arm: [statistics.median(t[i] for t in times) for i in (0, 1)] for arm, times in arms.items()}
    n = int(metrics["data/train_size"])
    model = f"{BACKBONE} (ImageNet) at 64 px" if BACKBONE else "test_resnet 32 px"
    print(f"{model}, digits {n} train images, {int(metrics['compute/epochs'])} epochs, {rounds} ", end="")
    print("alternating rounds; medians over rounds (each round's in brackets)\n")
    print("| step | wall s | CPU s | CPU share of the job |\n|---|---|---|---|")
    for arm, times in arms.items():
        name = "bare loop: same data, model, epochs, val and test passes" if arm == "loop" else arm
        name = "**whole job** (`run(cfg)`)" if arm == "job" else name
        wall = " / ".join(f"{t[0]:.2f}" for t in times)
        cpu = " / ".join(f"{t[1]:.2f}" for t in times)
        share = 100 * med[arm][1] / med["job"][1]
        print(f"| {name} | {med[arm][0]:.2f} ({wall}) | {med[arm][1]:.2f} ({cpu}) | {share:.0f} % |")
    for label, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {label} (mean) | | {seconds:.2f} | {100 * seconds / med['job'][1]:.0f} % |")
    for i, clock in enumerate(("wall", "CPU")):
        for arm, loop in [(a, b) for b in (SAME, "loop") for a in arms if a not in LOOPS]:
            each = " / ".join(f"{j[i] / p[i]:.2f}" for j, p in zip(arms[arm], arms[loop], strict=True))
            print(f"\n{arm} / {loop}, {clock}: {med[arm][i] / med[loop][i]:.2f}x (rounds: {each})", end="")
    print()


if __name__ == "__main__":
    main()
