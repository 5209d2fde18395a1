"""Feature cache: epoch time of a linear probe on cached features vs the uncached probe.

Each case runs one real job (`train.run`, MLflow into a temporary store) three times in one
process: uncached (`finetune.cache_features=off`), cached while building the entry, cached
again reading it. Epoch time is the job's fit time (train + validation) over its epochs; only
ratios are reported. `--study` also times a whole sweep (`experiment=default`) as subprocesses,
before (`finetune.cache_features=off`: probes recompute the backbone on augmented images) and as
shipped (probes on cached unaugmented features); `--only-probes` restricts it to its probe jobs.

Run: `python benchmarks/bench_features.py` (a few minutes on 2 cores) [--study [--only-probes]].
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# backbone, px, data overrides; weights are random (speed does not depend on their values)
CASES = [
    ("test_resnet", 32, ["data=animals_similar"]),  # the default study's backbone and target
    ("resnet18", 96, ["data=animals_similar"]),  # a real backbone, whose forward dominates an epoch
]
EPOCHS = 2


def probe_epoch_seconds(name: str, px: int, data: list[str], root: Path) -> dict[str, float]:
    from transferlab.config import compose_config
    from transferlab.jobs.run import run

    base = [
        f"backbone.name={name}",
        f"backbone.input_size={px}",
        "backbone.weights=scratch",
        *data,
        "data.augment=none",
        "finetune=probe",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.min_steps=0",
        "trainer.accelerator=cpu",
        f"cache_dir={root / 'cache'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "study=bench_features",
        "tracking.resume=false",  # the build and cached runs have one config: rerun, do not skip
    ]
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for label, mode in (("uncached", "off"), ("build", "auto"), ("cached", "auto")):
        metrics = run(compose_config([*base, f"finetune.cache_features={mode}"]))
        out[label] = metrics["compute/fit_seconds"] / metrics["compute/epochs"]
        out[f"{label}_flops"] = metrics["compute/train_flops"] + metrics["compute/cache_build_flops"]
    return out


def study_seconds(root: Path, mode: str, only_probes: bool) -> float:
    """Wall time of `transferlab train -m experiment=default`, feature cache `off` or as shipped."""
    extra = ["finetune=probe,probe_early"] if only_probes else []
    args = [
        "-m",
        "experiment=default",
        *(["finetune.cache_features=off"] if mode == "off" else []),
        *extra,
        f"cache_dir={root / 'cache'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.experiment=default_{mode}",
        f"hydra.sweep.dir={root / mode}",
    ]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferlab", "train", *args], check=True, capture_output=True, cwd=root)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", action="store_true", help="also time the default study, cache off vs shipped")
    parser.add_argument("--only-probes", action="store_true", help="study: only its probe and probe_early jobs")
    parser.add_argument("--no-epochs", action="store_true", help="skip the per-epoch table")
    opts = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not opts.no_epochs:
        epoch_table()
    if opts.study:
        study(opts.only_probes)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


def epoch_table() -> None:
    print("| backbone | px | uncached s/epoch | cached s/epoch | speed-up | first cached epoch incl. build |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, px, data in CASES:
            t = probe_epoch_seconds(name, px, data, Path(tmp) / name)
            print(
                f"| {name} | {px} | {t['uncached']:.3f} | {t['cached']:.4f} | "
                f"{t['uncached'] / t['cached']:.1f}x | {t['build'] / t['cached']:.1f}x the cached epoch |",
                flush=True,
            )


def study(only_probes: bool) -> None:
    """Pretrain the source and run advise (untimed, as `make sweep` does; advise also decodes the
    targets), then time the sweep with the cache off, then as shipped."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        pretrain = ["pretrain", f"cache_dir={root / 'cache'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}"]
        subprocess.run([sys.executable, "-m", "transferlab", *pretrain], check=True, capture_output=True, cwd=root)
        advise = ["advise", "experiment=default", *pretrain[1:]]
        subprocess.run([sys.executable, "-m", "transferlab", *advise], check=True, capture_output=True, cwd=root)
        print(f"source pretrained and targets advised (not timed below): {time.perf_counter() - start:.0f} s")
        off = study_seconds(root, "off", only_probes)
        shipped = study_seconds(root, "shipped", only_probes)
        scope = "probe jobs of the default study" if only_probes else "default study"
        print(f"{scope}: cache off {off:.0f} s, as shipped {shipped:.0f} s, ratio {off / shipped:.2f}x")


if __name__ == "__main__":
    main()
