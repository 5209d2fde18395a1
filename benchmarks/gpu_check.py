"""GPU check (issue 22): the one prepared script for the first session that is lent a GPU.

Five rows, each in its own subprocess with its own timeout (together <= 465 s), written as one
markdown table to `--out` and printed. A row that cannot run (no CUDA, hydra or mlflow missing,
a timeout, an exception) is recorded as skipped or failed; the script itself never crashes.
1. transforms: the tests skipped without CUDA (GPU transform == CPU transform), run with pytest.
2. train_rate: resnet50 224 px, bf16 autocast, channels_last: training samples/s of the framework's
   path (its TransferModule, data module and speed options under Lightning) / a bare PyTorch loop
   on synthetic on-device tensors (timm `benchmark.py --bench train` style). Target >= 0.9.
3. compile: tf_efficientnet_lite0 fine-tune steps/s with `trainer.compile` / without.
4. probe: one epoch of a linear head on cached frozen features vs one uncached probe epoch.
5. sweep: `transferlab train -m` of 4 tiny jobs with `hydra/launcher=joblib` on the one GPU.

`--dry-run` runs every row's code path on CPU with tiny sizes (test_resnet / test_efficientnet at
32 px, a few steps) (~105 s of CPU time); tests/test_gpu_check.py runs it in CI. Performance targets
are judged on a GPU only (dry-run rows that ran say `ran`); rows 1 and 5 are judged everywhere.
Run: `bash benchmarks/gpu_check.sh [--dry-run] [--rows probe,sweep] [--out FILE]` (header there).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "  # prefix of a row's (partial) result line on its stdout


@dataclass(frozen=True)
class Plan:
    """Sizes of one mode: the GPU check itself, or the CPU dry run that keeps its code alive."""

    accelerator: str
    precision: str  # bf16 autocast on the GPU; fp32 on the dry run's CPU (its bf16 kernels take seconds to warm)
    resnet: str
    effnet: str
    px: int
    warmup: int  # steps before the clock starts (cudnn autotune, compile, allocator)
    steps: int  # timed steps
    compile: str  # trainer.compile: true (inductor) or a backend name
    probe_epochs: int
    sweep_workers: int


GPU = Plan("gpu", "bf16-mixed", "resnet50", "tf_efficientnet_lite0", 224, 10, 40, "true", 6, 4)
DRY = Plan("cpu", "32-true", "test_resnet", "test_efficientnet", 32, 2, 3, "eager", 3, 2)


@dataclass(frozen=True)
class Row:
    what: str  # formatted with the plan
    target: str
    timeout: int  # seconds; the five add up to 465 (8 min with start-up)
    needs: tuple[str, ...]  # importable modules, checked before the row starts


ROWS = {
    "transforms": Row(
        "GPU transform matches CPU (tests/ skipped without CUDA, pytest)", "all pass", 45, ("pytest", "omegaconf")
    ),
    "train_rate": Row(
        "{p.resnet} {p.px} px {p.precision} channels_last: training samples/s, framework path / bare PyTorch loop",
        ">= 0.9x",
        90,
        ("pytorch_lightning", "timm"),
    ),
    "compile": Row(
        "{p.effnet} {p.px} px fine-tune steps/s, trainer.compile={p.compile} / eager",
        ">= 1.0x",
        150,
        ("pytorch_lightning", "timm"),
    ),
    "probe": Row(
        "{p.resnet} {p.px} px probe: epoch on cached features vs uncached epoch",
        ">= 20x",
        60,
        ("pytorch_lightning", "timm", "omegaconf", "hydra"),
    ),
    "sweep": Row(
        "4-job joblib sweep (`transferlab train -m`, {p.sweep_workers} workers) sharing one device: jobs finished",
        "4 of 4",
        120,
        ("omegaconf", "hydra", "mlflow", "hydra_plugins.hydra_joblib_launcher"),
    ),
}


# --- the parent: one subprocess per row, one table -------------------------------------------
@dataclass
class Outcome:
    value: str
    status: str  # pass | fail: why | skipped: why | ran (dry run: target not judged)
    seconds: float


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def child_env(dry_run: bool = False) -> dict[str, str]:
    """src/ importable without an install; on the dry run's CPU one intra-op thread per process:
    OpenMP threads of tiny ops spin against each other on a busy 2-core box (RESULTS.md, job tax)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return env | ({"OMP_NUM_THREADS": "1"} if dry_run else {})


def last_result(text: str) -> dict:
    """A row's result lines merged in order: a partial value survives a later error or timeout."""
    merged: dict = {}
    for line in text.splitlines():
        if line.startswith(RESULT):
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                merged |= json.loads(line[len(RESULT) :])
    return merged


def run_row(cmd: list[str], timeout: float, log: Path, cwd: Path | None = None, env: dict | None = None) -> Outcome:
    """Run one row's process group to its end or its timeout; its last result line is its value."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=env or child_env(), cwd=cwd, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
            reason = None
        except subprocess.TimeoutExpired:
            code, reason = None, f"timed out after {timeout:.0f} s"
        finally:  # the row's own children too (pytest, joblib workers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    found = last_result(text)
    value = found.get("value", "-")
    if reason is None and found.get("error"):
        reason = found["error"]
    elif reason is None and code != 0:
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        reason = f"exit code {code}: {tail[0][:200]}"
    if reason is not None:
        return Outcome(value, f"fail: {reason}", seconds)
    if found.get("skip"):
        return Outcome(value, f"skipped: {found['skip']}", seconds)
    ok = found.get("ok")
    status = "ran" if ok is None else "pass" if ok else "fail: " + found.get("note", "below target")
    if ok is not False and found.get("note"):
        status += f" ({found['note']})"
    return Outcome(value, status, seconds)


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def versions() -> str:
    names = ("torch", "timm", "pytorch-lightning", "hydra-core", "mlflow", "hydra-joblib-launcher")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def render(title: str, plan: Plan, outcomes: dict[str, Outcome], wall: float) -> str:
    lines = [title, "", "| # | what | value | target | status | seconds |", "|---|---|---|---|---|---|"]
    for i, (key, row) in enumerate(ROWS.items(), 1):
        if key in outcomes:
            o = outcomes[key]
            cells = (row.what.format(p=plan), o.value, row.target, o.status, f"{o.seconds:.1f}")
            lines.append(f"| {i} | " + " | ".join(cell(c) for c in cells) + " |")
    lines += ["", f"Wall time {wall:.0f} s."]
    return "\n".join(lines) + "\n"


def cuda_device() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def parent(opts: argparse.Namespace) -> int:
    start = time.perf_counter()
    plan = DRY if opts.dry_run else GPU
    keys = opts.rows.split(",") if opts.rows else list(ROWS)
    if unknown := set(keys) - set(ROWS):
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))}; rows are {', '.join(ROWS)}")
    cuda = None if opts.dry_run else cuda_device()  # the dry run uses the CPU, whatever is there
    device = cuda or f"no CUDA device used, {os.cpu_count()} CPU cores"
    mode = "CPU dry run (tiny sizes: not GPU numbers)" if opts.dry_run else "GPU check"
    title = f"{mode}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device}; {versions()}"
    print(title, flush=True)
    missing = {key: [m for m in ROWS[key].needs if not has_module(m)] for key in keys}
    for key in keys:
        print(f"[gpu_check] row {key} needs {', '.join(ROWS[key].needs)}; missing: {', '.join(missing[key]) or 'none'}")
    out = Path(opts.out) if opts.out else ROOT / "benchmarks" / "gpu_check_results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, Outcome] = {}
    with open(out.with_suffix(".log"), "w") as log, tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if not opts.dry_run and not cuda:
                outcomes[key] = Outcome("-", "skipped: no CUDA device (--dry-run runs the code paths on CPU)", 0.0)
            elif missing[key]:
                why = f"skipped: needs {', '.join(missing[key])} (carry the wheels: benchmarks/gpu_check.sh wheels)"
                outcomes[key] = Outcome("-", why, 0.0)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--row", key]
                cmd += ["--dry-run"] * opts.dry_run + ["--force-fail", opts.force_fail] * bool(opts.force_fail)
                row_log = Path(tmp) / f"{key}.log"
                outcomes[key] = run_row(cmd, ROWS[key].timeout, row_log, Path(tmp), child_env(opts.dry_run))
                log.write(f"## {key}: {' '.join(cmd)}\n" + "\n".join(row_log.read_text().splitlines()[-300:]) + "\n")
            print(f"[gpu_check] row {key}: {outcomes[key].status} ({outcomes[key].seconds:.0f} s)", flush=True)
    table = render(title, plan, outcomes, time.perf_counter() - start)
    out.write_text(table)
    print(f"\n{table}\n(table: {out}; row logs: {out.with_suffix('.log')})")
    return 1 if any(o.status.startswith("fail") for o in outcomes.values()) else 0


# --- a row, in its own process ----------------------------------------------------------------
def emit(**result) -> None:
    print(RESULT + json.dumps(result), flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first(*paths: str):
    """The first importable `module:attr`: the package is being reorganised, so look in old and new homes."""
    errors = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            errors.append(f"{path}: {type(err).__name__}: {err}")
    raise ImportError("; ".join(errors))


def data_overrides(plan: Plan) -> tuple[list[str], int]:
    """(data overrides, batch size): a train split of whole batches only (no partial last batch, so
    torch.compile never sees a second shape); the real animal silhouettes where installed."""
    if plan is DRY:
        return ["data=digits", "data.samples_per_class=8", "data.augment=light"], 8
    if has_module("animal_mnist"):  # 10 classes x 512 = 20 batches of 256
        return ["data=animals_similar", "data.classes=null", "data.samples_per_class=512", "data.augment=light"], 256
    return ["data=digits", "data.samples_per_class=64", "data.augment=light"], 128


def framework_job(plan: Plan, model: str, tmp: str, extra: list[str]):
    """(cfg, module, data module) built as a transferlab job builds them, speed options applied."""
    compose = first("transferlab.config:compose_config")
    create_backbone = first("transferlab.transfer.backbone:create_backbone", "transferlab.backbone:create_backbone")
    input_spec = first("transferlab.transfer.backbone:input_spec", "transferlab.backbone:input_spec")
    build_datamodule = first("transferlab.data:build_datamodule")
    # TransferModule itself, not routes.build_module: the standard route is exactly this, and its
    # registry imports the distillation route and with it mlflow, which the device may lack.
    transfer_module = first("transferlab.transfer.module:TransferModule", "transferlab.module:TransferModule")
    map_stages = first("transferlab.transfer.stages:map_stages", "transferlab.stages:map_stages")
    apply_speedups = first("transferlab.transfer.speed:apply_speedups", "transferlab.speed:apply_speedups")
    data, batch = data_overrides(plan)
    cfg = compose(
        [
            "backbone.weights=scratch",
            f"backbone.name={model}",
            f"backbone.input_size={plan.px}",
            f"trainer.accelerator={plan.accelerator}",
            f"cache_dir={tmp}",
            *data,
            f"data.batch_size={batch}",
            *extra,
        ]
    )
    backbone = create_backbone(cfg.backbone)
    net = getattr(backbone, "model", backbone)
    spec = input_spec(net, cfg.backbone)
    dm = build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=tmp)
    shape = (spec.in_chans, spec.size, spec.size)
    module = transfer_module(net, map_stages(net), dm.num_classes, shape, cfg.finetune, cfg.optim)
    apply_speedups(module, dm, cfg.trainer)
    return cfg, module, dm


def trainer_options(cfg) -> dict:
    """The job's device-dependent Trainer options (precision, determinism), as `run` passes them."""
    precision = first("transferlab.transfer.speed:precision", "transferlab.speed:precision")
    deterministic = first("transferlab.transfer.speed:deterministic", "transferlab.speed:deterministic")
    return {"precision": precision(cfg.trainer), "deterministic": deterministic(cfg.trainer)}


def make_clock(warmup: int, steps: int):
    import pytorch_lightning as pl
    import torch

    class Clock(pl.Callback):
        """Timed steps after `warmup` (synchronised), and every epoch's seconds."""

        def __init__(self) -> None:
            self.start = self.end = None
            self.samples, self.epochs, self.cudnn_benchmark = 0, [], None

        def on_train_start(self, trainer, module) -> None:
            self.fit_start = time.perf_counter()
            self.cudnn_benchmark = torch.backends.cudnn.benchmark

        def on_train_batch_start(self, trainer, module, batch, idx) -> None:
            if trainer.global_step == warmup and self.start is None:
                sync()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx) -> None:
            if self.start is not None and self.end is None:
                self.samples += len(batch[1])
                if trainer.global_step == warmup + steps:
                    sync()
                    self.end = time.perf_counter()

        def on_train_epoch_start(self, trainer, module) -> None:
            sync()
            self.epoch_start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            sync()
            self.epochs.append(time.perf_counter() - self.epoch_start)

        def rate(self) -> tuple[float, float, float]:
            """(samples/s, steps/s, warm-up seconds)"""
            seconds = self.end - self.start
            return self.samples / seconds, steps / seconds, self.start - self.fit_start

    return Clock()


def fit(module, data, options: dict, clock, max_epochs: int = 1000, max_steps: int = -1) -> None:
    """Lightning fit, training only (no validation, logger or checkpoints); `data` is a data module or loader."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        devices=1,
        max_epochs=max_epochs,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[clock, *step_callbacks()],
        **options,
    )
    trainer.fit(module, data)


def step_callbacks() -> list:
    """The job's callbacks that run every training step (the NaN check, the sample count), so the
    timed steps pay what a job's steps pay, a device read-back included."""
    names = ("transferlab.jobs.failures:FailOnNonFiniteLoss", "transferlab.transfer.compute:FitTimer")
    try:
        return [first(name)() for name in names]
    except ImportError:  # the minimal fallback runs without the package
        return []


def minimal_rate(plan: Plan, model: str, compile_: bool) -> tuple[float, float, float]:
    """Fallback when the framework cannot be built: a minimal LightningModule around the same timm
    model, on a loader of two synthetic batches."""
    import pytorch_lightning as pl
    import timm
    import torch
    import torch.nn.functional as F

    _, batch = data_overrides(plan)

    class Minimal(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model(model, num_classes=10).to(memory_format=torch.channels_last)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, idx):
            return F.cross_entropy(self(batch[0].contiguous(memory_format=torch.channels_last)), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    module = Minimal()
    if compile_:
        module.compile(**({} if plan.compile == "true" else {"backend": plan.compile}))
    x, y = torch.randn(2 * batch, 3, plan.px, plan.px), torch.randint(0, 10, (2 * batch,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, drop_last=True)
    clock = make_clock(plan.warmup, plan.steps)
    fit(
        module,
        loader,
        {"accelerator": plan.accelerator, "precision": plan.precision},
        clock,
        max_steps=plan.warmup + plan.steps,
    )
    return clock.rate()


def framework_rate(plan: Plan, model: str, tmp: str, compile_: bool) -> tuple[tuple[float, float, float], str, int]:
    """(rate, which path ran, batch): the framework's fine-tune path, else the minimal fallback."""
    extra = [f"trainer.precision={plan.precision}", "trainer.channels_last=true", "finetune=fine_tune"]
    extra.append(f"trainer.compile={plan.compile if compile_ else 'false'}")
    _, batch = data_overrides(plan)
    try:
        cfg, module, dm = framework_job(plan, model, tmp, extra)
        options = {"accelerator": plan.accelerator, **trainer_options(cfg)}
    except (ImportError, AttributeError, TypeError) as err:  # moved or changed API: measure the fallback
        return minimal_rate(plan, model, compile_), f"fallback minimal LightningModule ({type(err).__name__})", batch
    clock = make_clock(plan.warmup, plan.steps)
    fit(module, dm, options, clock, max_steps=plan.warmup + plan.steps)
    return clock.rate(), f"TransferModule, cudnn.benchmark={clock.cudnn_benchmark}", batch


def bare_rate(plan: Plan, model: str, batch: int, classes: int = 10) -> float:
    """timm benchmark.py --bench train: synthetic on-device batch, AdamW, autocast, channels_last."""
    import timm
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if plan.accelerator == "gpu" else "cpu")
    torch.backends.cudnn.benchmark = True  # as timm's benchmark.py
    net = timm.create_model(model, num_classes=classes).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, plan.px, plan.px, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    for i in range(plan.warmup + plan.steps):
        if i == plan.warmup:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16-mixed"):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return plan.steps * batch / (time.perf_counter() - start)


def cuda_only_tests() -> list[str]:
    """Node ids of tests/ whose skipif asks for CUDA (a module-level pytestmark takes the file)."""
    ids = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "skipif" not in line or "cuda.is_available()" not in line:
                continue
            if line.startswith("pytestmark"):
                ids.append(str(path.relative_to(ROOT)))
                continue
            for later in lines[i + 1 : i + 8]:
                if match := re.match(r"\s*(?:async\s+)?def (test_\w+)", later):
                    ids.append(f"{path.relative_to(ROOT)}::{match.group(1)}")
                    break
    return list(dict.fromkeys(ids))


def row_transforms(plan: Plan, tmp: str) -> dict:
    import xml.etree.ElementTree as ET

    ids = cuda_only_tests()
    if not ids:
        return {"value": "no test in tests/ is skipped without CUDA", "ok": False, "note": "none found"}
    report = Path(tmp) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *ids]
    if not has_module("mlflow"):  # tests/conftest.py imports mlflow; these tests use none of its fixtures
        cmd.append("--noconftest")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env())
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    if not report.exists():
        return {"value": f"pytest exit {done.returncode}, no report", "ok": False, "note": "pytest did not run"}
    counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    value = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped ({ids[0]}…)"
    if plan is DRY and counts["skipped"] == counts["tests"]:  # the dry run's CPU: no CUDA to test
        return {"value": value, "skip": f"no CUDA: pytest skipped all {counts['tests']} CUDA-only tests"}
    return {"value": value, "ok": passed == counts["tests"] > 0}


def row_train_rate(plan: Plan, tmp: str) -> dict:
    (fw, _, _), path, batch = framework_rate(plan, plan.resnet, tmp, compile_=False)
    emit(value=f"framework {fw:.0f} samples/s (batch {batch}); bare loop not measured yet")
    bare = bare_rate(plan, plan.resnet, batch)
    ratio = fw / bare
    value = f"{ratio:.2f}x: framework {fw:.0f} vs bare {bare:.0f} samples/s (batch {batch}, {path})"
    return {"value": value, "ok": None if plan is DRY else ratio >= 0.9}


def row_compile(plan: Plan, tmp: str) -> dict:
    (_, eager, _), path, batch = framework_rate(plan, plan.effnet, tmp, compile_=False)
    emit(value=f"eager {eager:.2f} steps/s (batch {batch}); compiled not measured yet")
    (_, compiled, warm), _, _ = framework_rate(plan, plan.effnet, tmp, compile_=True)
    ratio = compiled / eager
    value = (
        f"{ratio:.2f}x: compiled {compiled:.2f} vs eager {eager:.2f} steps/s (batch {batch}, {path}); "
        f"compiled warm-up {warm:.0f} s"
    )
    return {"value": value, "ok": None if plan is DRY else ratio >= 1.0}


def row_probe(plan: Plan, tmp: str) -> dict:
    import pytorch_lightning as pl

    phase_features = first("transferlab.transfer.features:PhaseFeatures", "transferlab.features:PhaseFeatures")
    cfg, module, dm = framework_job(plan, plan.resnet, tmp, ["finetune=probe"])
    module.set_trainable(frozenset())  # the probe's one phase: the head alone
    options = {"accelerator": plan.accelerator, **trainer_options(cfg)}
    features = phase_features(cfg, module, dm, [])
    on_features = features.datamodule("head", frozenset(), pl.Trainer(devices=1, logger=False, **options))
    if not module.on_features:
        return {"value": "feature cache not used", "ok": False, "note": "; ".join(features.reasons)[:200]}
    start = time.perf_counter()
    on_features.train_dataloader()  # builds the train entry: the frozen forward over every image, once
    sync()
    build = time.perf_counter() - start
    clock = make_clock(0, 0)
    fit(module, on_features, options, clock, max_epochs=plan.probe_epochs)
    cached = statistics.median(clock.epochs[1:])
    emit(value=f"cached epoch {cached:.3f} s; uncached not measured yet; build {build:.1f} s")
    cfg, module, dm = framework_job(plan, plan.resnet, tmp, ["finetune=probe", "finetune.cache_features=off"])
    module.set_trainable(frozenset())
    clock = make_clock(0, 0)
    fit(module, dm, options, clock, max_epochs=2)  # the first epoch warms up; the second is timed
    uncached = clock.epochs[-1]
    n = len(dm.splits["train"][1])
    value = (
        f"{uncached / cached:.0f}x: {cached:.3f} s per cached epoch vs {uncached:.2f} s uncached "
        f"({n} train images); features built once in {build:.1f} s"
    )
    return {"value": value, "ok": None if plan is DRY else uncached / cached >= 20}


SWEEP_JOB = [  # tests/conftest.py's FAST job: 5 digits per class, 1 epoch, random init
    "backbone.weights=scratch",
    "data=digits",
    "data.samples_per_class=5",
    "data.augment=none",
    "trainer.max_epochs=1",
    "trainer.min_steps=0",
    "tracking.log_model=false",
]


def row_sweep(plan: Plan, tmp: str) -> dict:
    import mlflow

    uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.search_experiments()  # migrate once: parallel first-time migrations fail (NOTES.md)
    cmd = [sys.executable, "-m", "transferlab", "train", "-m", *SWEEP_JOB, f"trainer.accelerator={plan.accelerator}"]
    cmd += ["study=gpu_check", "seed=0,1,2,3", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={plan.sweep_workers}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**child_env(), "MLFLOW_TRACKING_URI": uri})
    wall = time.perf_counter() - start
    print(done.stdout[-6000:], done.stderr[-6000:], flush=True)
    summary = next((line for line in done.stdout.splitlines() if line.startswith("sweep gpu_check:")), "no summary")
    experiment = client.get_experiment_by_name("gpu_check")
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id], "tags.`transferlab.role`='job'")
    finished = sum(r.info.status == "FINISHED" for r in runs)
    on_gpu = sum(r.data.metrics.get("compute/cuda_peak_mb", 0) > 0 for r in runs)
    value = f"{finished} of 4 FINISHED in MLflow, {on_gpu} used CUDA memory; wall {wall:.0f} s; '{summary[:90]}'"
    ok = done.returncode == 0 and finished == 4 and (plan is DRY or on_gpu == 4)
    return {"value": value, "ok": ok, "note": f"exit {done.returncode}" if not ok else ""}


ROW_FUNCTIONS = {
    "transforms": row_transforms,
    "train_rate": row_train_rate,
    "compile": row_compile,
    "probe": row_probe,
    "sweep": row_sweep,
}


def child(opts: argparse.Namespace) -> int:
    import traceback

    plan = DRY if opts.dry_run else GPU
    if plan is DRY and opts.row != "sweep":
        import torch

        # oneDNN builds new conv primitives per shape and freeze pattern (seconds each on tiny
        # inputs, tests/conftest.py's native_cpu_kernels); the native kernels are faster here.
        torch.backends.mkldnn.enabled = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            emit(**ROW_FUNCTIONS[opts.row](plan, tmp))
        if opts.force_fail == opts.row:
            raise RuntimeError(f"forced failure after the row ran (--force-fail {opts.row})")
    except Exception as err:
        traceback.print_exc()
        emit(error=f"{type(err).__name__}: {str(err)[:300]}")
        return 1
    return 0


# --- wheels for a device machine that has torch but not hydra/mlflow ---------------------------
WHEEL_ROOTS = ("hydra-core", "omegaconf", "mlflow", "hydra-joblib-launcher")
NO_DEPS = ("animal-mnist",)  # declares tensorflow; only its data files are read (Makefile)
# Python packages on the nvidia-h200 image, as listed on 2026-11-17: never carried (a second copy
# on PYTHONPATH would shadow the one the image's torch was built against).
_DEVICE_IMAGE = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib
    kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
    pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
    pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
    rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE_HAS = set(_DEVICE_IMAGE.split())


def wheel_list() -> list[str]:
    """`name==version` of what the device lacks: the installed closure of WHEEL_ROOTS for Python 3.12 on Linux."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    env |= {"platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64", "extra": ""}
    todo, pinned = [*WHEEL_ROOTS, *NO_DEPS], {}
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pinned or name in DEVICE_HAS:
            continue
        dist = importlib.metadata.distribution(name)
        pinned[name] = dist.version
        if name in NO_DEPS:
            continue
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return [f"{name}=={version}" for name, version in sorted(pinned.items())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every row's code path")
    parser.add_argument("--out", help="markdown table path (default benchmarks/gpu_check_results.md)")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--force-fail", choices=list(ROWS), help="make this row fail after it ran (tests)")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # one row, in its own process
    parser.add_argument("--wheel-list", action="store_true", help="print name==version of the wheels to carry")
    opts = parser.parse_args()
    if opts.wheel_list:
        print("\n".join(wheel_list()))
        return 0
    return child(opts) if opts.row else parent(opts)


if __name__ == "__main__":
    sys.exit(main())
