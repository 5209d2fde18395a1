"""Time of `transferlab advise` on one target against that target's sweep (4 strategies x seeds).

The issue's bar: advise for one target costs at most 10 % of the target's sweep. Both run in one
process into a temporary MLflow store, with random-init weights (the feature and training cost do
not depend on what the weights are, and no source model is needed). Advise is timed cold: its
feature cache starts empty. Run: `python benchmarks/bench_advise.py [--seeds N] [--per-class K]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

STRATEGIES = ("scratch", "probe", "probe_early", "fine_tune")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", default="5", help="data.samples_per_class (null: all)")
    parser.add_argument("--data", default="digits")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.chdir(tmp)
        from transferlab.config import compose_config
        from transferlab.jobs.run import run
        from transferlab.studies.advise import Settings, advise_target

        target = ["study=bench", f"data={opts.data}", f"data.samples_per_class={opts.per_class}"]
        compose_config(target)  # warm Hydra and the store before timing
        start = time.perf_counter()
        advice = advise_target(target, [["backbone.weights=scratch"]], Settings())
        advise_s = time.perf_counter() - start
        jobs = []
        for strategy in STRATEGIES:
            for seed in range(opts.seeds):
                cfg = compose_config([*target, f"finetune={strategy}", f"seed={seed}", "backbone.weights=scratch"])
                start = time.perf_counter()
                run(cfg)
                jobs.append(time.perf_counter() - start)
    sweep_s = sum(jobs)
    print("| target | advise s | jobs | sweep s (sum of jobs) | advise / sweep |")
    print("|---|---|---|---|---|")
    print(f"| {advice.target} | {advise_s:.1f} | {len(jobs)} | {sweep_s:.1f} | {100 * advise_s / sweep_s:.1f}% |")


if __name__ == "__main__":
    main()
