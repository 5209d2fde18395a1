"""Data path benchmarks, ratios measured in one run (see RESULTS.md "Data path").

1. Framework tax: one epoch of transferlab training (Lightning Trainer, TransferModule, data
   module) vs a hand-written PyTorch loop on the same model, uint8 data, transform and batch.
2. Data pipeline alone (loader + crop/augment/normalise) vs the rate the model trains at.
3. A prepared store of 20k generated JPEGs: first job (decodes) vs second job (reuses), time to
   the first training step of a fresh process, and peak RSS with the store larger than the RAM
   budget vs read into RAM.
4. On a CUDA device only: resnet50 224 px batch 256 (bf16, channels_last): transferlab vs a bare
   loop on synthetic on-device tensors; full fine-tune vs frozen backbone; fp32 vs bf16 vs compile.

Run: `python benchmarks/bench_data.py` (≈ 10 min on 2 heavily shared cores; BENCH_IMAGES shrinks
part 3, BENCH_ONLY=tax|store|gpu runs one part).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from transferlab.config import compose_config
from transferlab.data import build_datamodule
from transferlab.transfer.backbone import create_backbone, input_spec
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages

N_IMAGES = int(os.environ.get("BENCH_IMAGES", 20_000))
ROOT = Path(__file__).resolve().parents[1]


def setup(overrides: list[str], cache: Path):
    cfg = compose_config(["backbone.weights=scratch", "trainer.accelerator=cpu", *overrides])
    backbone = create_backbone(cfg.backbone)
    spec = input_spec(backbone.model, cfg.backbone)
    data = build_datamodule(cfg.data, spec, 0, cache_dir=cache)
    module = TransferModule(
        backbone.model, map_stages(backbone.model), data.num_classes, (3, spec.size, spec.size), cfg.finetune, cfg.optim
    )
    return cfg, data, module


EPOCHS = 4  # the first epoch of either side warms caches and allocators; later ones are the steady state


class EpochClock(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def lightning_epochs(module, data) -> tuple[list[float], float]:
    """Per-epoch seconds of one `fit` and its total (the difference is the fit's start-up)."""
    clock = EpochClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return clock.seconds, time.perf_counter() - start


def plain_epochs(module, data) -> list[float]:
    """What a user would write by hand: the same loader, transform, model, AdamW, loss."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    seconds = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        for x, y in data.train_dataloader():
            loss = torch.nn.functional.cross_entropy(module(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_tax_and_pipeline(cache: Path) -> list[str]:
    overrides = ["data.samples_per_class=400", "data.batch_size=64", "data.augment=light"]
    cfg, data, module = setup(overrides, cache)
    n = len(data.splits["train"][1])
    lit_epochs, lit_total = lightning_epochs(module, data)
    plain = plain_epochs(module, data)
    lit, plain_s = float(np.median(lit_epochs[1:])), float(np.median(plain[1:]))
    startup = lit_total - sum(lit_epochs)
    # pipeline alone: loader + transform, no model
    start = time.perf_counter()
    for _ in data.train_dataloader():
        pass
    pipe = time.perf_counter() - start
    model_only = plain_s - pipe
    return [
        f"| framework tax: transferlab epoch vs plain loop, median of epochs 2-{EPOCHS} (test_resnet 32 px, "
        f"batch 64, {n} images) | {n / lit:.0f} vs {n / plain_s:.0f} img/s | **{plain_s / lit:.3f}** | >= 0.95 |",
        f"| one-off start-up of a Lightning fit (setup, loaders, optimizer; outside the epochs) | {startup:.2f} s "
        f"| {startup / lit:.2f} epochs | - |",
        f"| data pipeline alone vs model consumption (same epoch) | {n / pipe:.0f} vs {n / model_only:.0f} img/s "
        f"| **{model_only / pipe:.1f}x** | >= 1.5x |",
    ]


def write_jpegs(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(classes, 80, 96, 3), dtype=np.uint8)
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 40, size=(80, 96, 3), dtype=np.uint8)
        Image.fromarray(base[i % classes] // 2 + noise).save(folder / f"{i}.jpg", quality=85)


_JOB = """
import json, sys, time
t0 = time.perf_counter()
import pytorch_lightning as pl, torch
from transferlab.config import compose_config
from transferlab.data import build_datamodule
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages
from transferlab.transfer.backbone import create_backbone, input_spec
t_import = time.perf_counter() - t0
root, cache, budget, epoch = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
cfg = compose_config(["backbone.weights=scratch", "data=imagefolder", f"data.root={root}", "data.crop_pct=1.0",
                      "backbone.input_size=64", "data.batch_size=64", "data.num_workers=0"])
cfg.data.ram_budget_mb = budget
bb = create_backbone(cfg.backbone)
spec = input_spec(bb.model, cfg.backbone)
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
rss_before = status("VmRSS")
t1 = time.perf_counter()
data = build_datamodule(cfg.data, spec, 0, cache_dir=cache)
t_data = time.perf_counter() - t1
module = TransferModule(bb.model, map_stages(bb.model), data.num_classes, (3, 64, 64), cfg.finetune, cfg.optim)
first = {}
class First(pl.Callback):
    def on_train_batch_end(self, *a):
        first.setdefault("t", time.perf_counter() - t0)
trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[First()])
trainer.fit(module, datamodule=data)
if epoch:  # read every train image once (the whole pipeline, no model) to exercise memory
    for _ in data.train_dataloader():
        pass
print(json.dumps({"import": t_import, "data": t_data, "first_step": first["t"],
                  "peak_mb": status("VmHWM"), "growth_mb": status("VmHWM") - rss_before,
                  "in_ram": isinstance(data.splits["train"][0], torch.Tensor)}))
"""


def job(root: Path, cache: Path, budget_mb: float, epoch: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _JOB, str(root), str(cache), str(budget_mb), "1" if epoch else "0"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_store(tmp: Path) -> list[str]:
    root, cache = tmp / "jpegs", tmp / "cache"
    start = time.perf_counter()
    write_jpegs(root, N_IMAGES)
    gen = time.perf_counter() - start
    first = job(root, cache, 1024, epoch=False)
    second = job(root, cache, 1024, epoch=False)
    store_mb = N_IMAGES * 3 * 64 * 64 / 2**20
    on_disk = job(root, cache, store_mb / 8, epoch=True)
    in_ram = job(root, cache, 4 * store_mb, epoch=True)
    return [
        f"| first job: decode {N_IMAGES} JPEGs into the store (generated in {gen:.0f} s) "
        f"| {first['data']:.1f} s | - | - |",
        f"| second job: prepare data (store reused, nothing decoded) | {second['data']:.2f} s "
        f"| **{first['data'] / second['data']:.0f}x** faster | - |",
        f"| second job: process start to first training step (imports {second['import']:.1f} s included) "
        f"| **{second['first_step']:.1f} s** | - | < 5 s |",
        f"| peak RSS above the process before data, store {store_mb:.0f} MB > RAM budget {store_mb / 8:.0f} MB "
        f"(read from disk) vs read into RAM, one full pass | {on_disk['growth_mb']:.0f} MB vs "
        f"{in_ram['growth_mb']:.0f} MB (peaks {on_disk['peak_mb']:.0f} / {in_ram['peak_mb']:.0f} MB) "
        f"| **{on_disk['growth_mb'] / store_mb:.2f}** of the store | bounded |",
    ]


def bench_gpu() -> list[str]:
    """resnet50 224 px batch 256: needs CUDA; unmeasured where there is none."""
    if not torch.cuda.is_available():
        return ["| GPU benchmark (resnet50 224 px, batch 256, bf16) | skipped: no CUDA device | - | >= 0.9 |"]
    import timm

    device, batch, size = torch.device("cuda"), 256, 224

    def bare(precision: str, compile_: bool, frozen: bool) -> float:
        model = timm.create_model("resnet50", num_classes=10).to(device, memory_format=torch.channels_last)
        if frozen:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("fc."))
        step_model = torch.compile(model) if compile_ else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for i in range(25):
            if i == 5:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=dtype, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        return 20 * batch / (time.perf_counter() - start)

    def transferlab_rate(strategy: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config(
                [
                    "backbone.name=resnet50",
                    "backbone.weights=scratch",
                    "backbone.input_size=224",
                    "data.source=animals",
                    "data.classes=null",
                    "data.crop_pct=0.875",
                    f"data.batch_size={batch}",
                    "data.augment=light",
                    f"finetune={strategy}",
                ]
            )
            bb = create_backbone(cfg.backbone)
            spec = input_spec(bb.model, cfg.backbone)
            data = build_datamodule(cfg.data, spec, 0, cache_dir=tmp)
            data.memory_format = torch.channels_last
            module = TransferModule(
                bb.model, map_stages(bb.model), data.num_classes, (3, size, size), cfg.finetune, cfg.optim
            )
            if strategy == "probe":
                module.set_trainable(frozenset())
            module.to(memory_format=torch.channels_last)
            seen = {}

            class Clock(pl.Callback):
                def on_train_batch_start(self, trainer, *a):
                    if trainer.global_step == 5:
                        torch.cuda.synchronize()
                        seen["t"] = time.perf_counter()

            trainer = pl.Trainer(
                accelerator="gpu",
                devices=1,
                precision="bf16-mixed",
                max_steps=25,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                limit_val_batches=0,
                callbacks=[Clock()],
            )
            trainer.fit(module, datamodule=data)
            torch.cuda.synchronize()
            return 20 * batch / (time.perf_counter() - seen["t"])

    name = torch.cuda.get_device_name()
    bare_bf16, full = bare("bf16", False, False), transferlab_rate("fine_tune")
    frozen, probe = bare("bf16", False, True), transferlab_rate("probe")
    fp32, compiled = bare("fp32", False, False), bare("bf16", True, False)
    rows = [
        f"| {name}: transferlab full fine-tune vs bare synthetic loop (bf16, channels_last) "
        f"| {full:.0f} vs {bare_bf16:.0f} img/s | **{full / bare_bf16:.2f}** | >= 0.9 |",
        f"| {name}: bare loop, frozen backbone vs full fine-tune | {frozen:.0f} vs {bare_bf16:.0f} img/s "
        f"| {frozen / bare_bf16:.2f} | - |",
        f"| {name}: transferlab probe on images (frozen backbone) | {probe:.0f} img/s | - | - |",
        f"| {name}: bare loop fp32 / bf16 / bf16+compile | {fp32:.0f} / {bare_bf16:.0f} / {compiled:.0f} img/s "
        f"| {bare_bf16 / fp32:.2f} / {compiled / bare_bf16:.2f} | - |",
    ]
    return rows


def main() -> None:
    torch.manual_seed(0)
    print(f"# bench_data on {os.cpu_count()} CPU(s), torch {torch.__version__}; machine shared with other work")
    print("| measurement | values | ratio | target |\n|---|---|---|---|")
    only = os.environ.get("BENCH_ONLY")  # tax | store | gpu: one part only
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if only in (None, "tax"):
            rows += bench_tax_and_pipeline(Path(tmp) / "animals")
        if only in (None, "store"):
            rows += bench_store(Path(tmp))
    if only in (None, "gpu"):
        rows += bench_gpu()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
