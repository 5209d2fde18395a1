"""The study's tables: finished job runs from MLflow, labelled, and the statistics over them.

Which runs count, which conditions are one strategy, means and CIs over seeds, paired verdicts:
the data side of the report, apart from the words (report.py) so each reads on its own.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from transferlab import tags as tag_names
from transferlab.errors import ConfigError
from transferlab.studies.stats import MIN_SEEDS, ci_halfwidth, clipped_interval, holm, paired_p, verdict
from transferlab.tags import target_name

METRICS = {
    "test/acc": "test_acc",
    "val/acc": "val_acc",  # the last validation
    "data/train_size": "train_size",
    "compute/train_flops": "train_flops",
    "compute/train_flops_per_sample": "train_flops_per_sample",
    "compute/eval_flops": "eval_flops",
    "compute/cache_build_flops": "cache_build_flops",
    "compute/fit_seconds": "fit_seconds",
    "compute/trainable_params": "trainable_params",
    "compute/teacher_fit_flops": "teacher_fit_flops",  # distillation: the teacher's own training
    "data/test_size": "test_size",
}
# Params that differ between runs of one condition by design; never part of a strategy label.
# These vary between runs without changing what the job computes.
NOT_CONDITION = {"seed", "study", "hydra.overrides", "tracking.experiment", "tracking.uri"}


class Tables(NamedTuple):
    runs: pd.DataFrame  # one row per counted run, with `target` and `strategy` labels
    summary: pd.DataFrame  # per target x strategy
    pairs: pd.DataFrame  # per target x strategy pair, paired by seed


def load_runs(client: Any, experiment: str) -> pd.DataFrame:
    """Finished job runs of a study: metrics as columns, params as `params.<key>` columns."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}; check the study name")
    rows, token, unfinished = [], None, 0
    while True:
        page = client.search_runs(
            [exp.experiment_id], tag_names.role_query(tag_names.ROLE_JOB), max_results=1000, page_token=token
        )
        for run in page:
            if run.info.status != "FINISHED":
                unfinished += 1
                continue
            params, tags = run.data.params, run.data.tags
            cond = tags.get(tag_names.CONDITION_HASH) or _condition_key(params)
            row = {"run_id": run.info.run_id, "start_time": run.info.start_time, "end_time": run.info.end_time}
            row |= {"condition_hash": cond, "seed": _as_seed(params.get("seed"))}
            row |= {col: run.data.metrics.get(key, np.nan) for key, col in METRICS.items()}
            row |= {f"version.{k}": tags.get(tag_names.tag(k)) for k in tag_names.VERSION_NAMES}
            row["version.git"] = tags.get("mlflow.source.git.commit")
            row["truncated_at"] = tags.get(tag_names.TRUNCATED_AT)
            rows.append(row | {f"params.{k}": v for k, v in params.items()})
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows)
    df.attrs["n_unfinished"] = unfinished
    return df


def _condition_key(params: dict[str, str]) -> str:
    """Stand-in for a missing condition_hash tag: the params that are not the seed."""
    return repr(sorted((k, v) for k, v in params.items() if k not in NOT_CONDITION))


def _as_seed(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def label_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Add `target` and `strategy` labels.

    Conditions that share a strategy name but differ in any param get that param in their label,
    so they are never averaged together. A rerun of the same condition and seed keeps the latest.
    """
    df = runs.copy()
    df["data_name"] = [target_name(p) for p in df.filter(like="params.data.").to_dict("records")]
    df["target"] = [tag_names.target_label(d, s) for d, s in zip(df["data_name"], df["train_size"])]
    df["strategy"] = df["params.finetune.strategy"].astype(str)
    pcols = [c for c in df.columns if c.startswith("params.") and c[7:] not in NOT_CONDITION]
    for (_, base), group in df.groupby(["target", "strategy"]):
        conds = group.groupby("condition_hash")[pcols].first().fillna("None").astype(str)
        if len(conds) < 2:
            continue
        varying = [c for c in pcols if conds[c].nunique() > 1]
        if WEIGHTS in varying:  # the source says it all: "probe (from ImageNet)", not three params,
            # unless backbones differ under one source too: "from ImageNet, tf_efficientnet_lite1"
            same_source = [c for c in varying if c.startswith("params.backbone.") and c != WEIGHTS]
            within = [c for c in same_source if (conds.groupby(WEIGHTS)[c].nunique() > 1).any()]
            varying = [WEIGHTS] + [c for c in varying if c in within or not c.startswith("params.backbone.")]
        for cond, values in conds.iterrows():
            extra = ", ".join(_varied(c, values) for c in varying) or f"cond {cond[:8]}"
            df.loc[group.index[group["condition_hash"] == cond], "strategy"] = f"{base} ({extra})"
    if "start_time" in df:
        df = df.sort_values("start_time", kind="stable")
    counted = df.drop_duplicates(["target", "strategy", "seed"], keep="last")
    counted.attrs["n_superseded"] = len(df) - len(counted)
    return counted


WEIGHTS = "params.backbone.weights"
SOURCE_NAMES = {"pretrained": "ImageNet", "scratch": "scratch"}


def _varied(column: str, values: pd.Series) -> str:
    """One varying param in a strategy label; a backbone's weights as the source they came from."""
    if column == "params.backbone.name":  # beside its source: "from ImageNet, tf_efficientnet_lite2"
        return str(values[column])
    if column != WEIGHTS:
        return f"{column[7:]}={values[column]}"
    weights = str(values[column])
    source = values.get("params.backbone.source", "source") if weights == "source" else weights
    return f"from {SOURCE_NAMES.get(weights, source)}"


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per target x strategy: seeds, accuracy mean/std/CI (pts) and mean compute."""
    rows = []
    for (target, strategy), g in runs.groupby(["target", "strategy"]):
        acc = g["test_acc"].to_numpy(float) * 100
        rows.append(
            {
                "target": target,
                "data": g["data_name"].iloc[0],
                "train_size": g["train_size"].iloc[0],
                "strategy": strategy,
                "n": len(acc),
                "seeds": " ".join(str(s) for s in sorted(g["seed"], key=str)),
                "acc_mean_pct": acc.mean(),
                "acc_std_pct": acc.std(ddof=1) if len(acc) > 1 else math.nan,
                "acc_ci95_pct": ci_halfwidth(acc),
                "acc_ci_low_pct": clipped_interval(acc.mean(), ci_halfwidth(acc))[0],
                "acc_ci_high_pct": clipped_interval(acc.mean(), ci_halfwidth(acc))[1],
                "val_acc_mean_pct": g["val_acc"].mean() * 100 if "val_acc" in g else math.nan,
                "test_size": g["test_size"].min() if "test_size" in g else math.nan,
                "train_flops": g["train_flops"].mean(),
                "train_flops_per_sample": g["train_flops_per_sample"].mean(),
                "eval_flops": g["eval_flops"].mean() if "eval_flops" in g else math.nan,
                # the feature-cache build: paid once, by the run that built it (features.py)
                "cache_build_flops": g["cache_build_flops"].fillna(0).sum() if "cache_build_flops" in g else 0.0,
                "fit_seconds": g["fit_seconds"].mean(),
                "trainable_params": g["trainable_params"].mean(),
                "teacher_fit_flops": g["teacher_fit_flops"].mean() if "teacher_fit_flops" in g else math.nan,
            }
        )
    order = ["data", "train_size", "acc_mean_pct"]
    return pd.DataFrame(rows).sort_values(order, ascending=[True, True, False], ignore_index=True)


def pair_table(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Paired-by-seed differences A - B (pts) for every strategy pair within a target; p-values
    Holm-corrected over every pair of the study (the family a reader scans for "significant")."""
    rows, diffs = [], []
    for target, s in summary.groupby("target", sort=False):
        acc = runs[runs["target"] == target].pivot(index="seed", columns="strategy", values="test_acc")
        quantum = 100 / s["test_size"].min() if s["test_size"].min() > 0 else math.nan
        for a, b in itertools.combinations(s["strategy"], 2):
            diff = ((acc[a] - acc[b]) * 100).dropna().to_numpy()
            n, mean, half = len(diff), diff.mean() if len(diff) else math.nan, ci_halfwidth(diff)
            testable = n >= MIN_SEEDS
            rows.append([target, a, b, n, mean, mean - half, mean + half, paired_p(diff) if testable else math.nan])
            diffs.append((diff, quantum))
    cols = ["target", "a", "b", "n", "diff_mean_pts", "ci_low_pts", "ci_high_pts", "p"]
    pairs = pd.DataFrame(rows, columns=cols)
    pairs["p_holm"] = holm(pairs["p"].tolist()) if len(pairs) else []
    pairs["verdict"] = [verdict(d, p, q) for (d, q), p in zip(diffs, pairs["p_holm"])]
    return pairs


def summarize(runs: pd.DataFrame) -> Tables:
    """Pure tables from loaded runs; no MLflow needed, so tests feed synthetic frames."""
    labelled = label_runs(runs)
    summary = summary_table(labelled)
    return Tables(labelled, summary, pair_table(labelled, summary))
