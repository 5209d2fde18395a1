"""Accuracy-vs-compute report over a study's MLflow runs.

Means and 95% confidence intervals over seeds, paired comparisons that say plainly which
differences are within noise, and a Pareto plot of accuracy against training FLOPs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from transferlab.errors import ConfigError

ROLE_TAG = "transferlab.role"
METRICS = {
    "test/acc": "test_acc",
    "data/train_size": "train_size",
    "compute/train_flops": "train_flops",
    "compute/train_flops_per_sample": "train_flops_per_sample",
    "compute/fit_seconds": "fit_seconds",
    "compute/trainable_params": "trainable_params",
}
# Params that differ between runs of one condition by design; never part of a strategy label.
# These vary between runs without changing what the job computes.
NOT_CONDITION = {"seed", "study", "hydra.overrides", "tracking.experiment", "tracking.uri"}
SIGNIFICANT = ("A > B (significant)", "B > A (significant)")


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
        page = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'job'", max_results=1000, page_token=token)
        for run in page:
            if run.info.status != "FINISHED":
                unfinished += 1
                continue
            params, tags = run.data.params, run.data.tags
            cond = tags.get("transferlab.condition_hash") or _condition_key(params)
            row = {"run_id": run.info.run_id, "start_time": run.info.start_time}
            row |= {"condition_hash": cond, "seed": _as_seed(params.get("seed"))}
            row |= {col: run.data.metrics.get(key, np.nan) for key, col in METRICS.items()}
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
    df["data_name"] = df["params.data.name"].astype(str)
    df["target"] = [
        f"{d} / {int(s)} train" if pd.notna(s) else f"{d} / ? train" for d, s in zip(df["data_name"], df["train_size"])
    ]
    df["strategy"] = df["params.finetune.strategy"].astype(str)
    pcols = [c for c in df.columns if c.startswith("params.") and c[7:] not in NOT_CONDITION]
    for (_, base), group in df.groupby(["target", "strategy"]):
        conds = group.groupby("condition_hash")[pcols].first().fillna("None").astype(str)
        if len(conds) < 2:
            continue
        varying = [c for c in pcols if conds[c].nunique() > 1]
        for cond, values in conds.iterrows():
            extra = ", ".join(f"{c[7:]}={values[c]}" for c in varying) or f"cond {cond[:8]}"
            df.loc[group.index[group["condition_hash"] == cond], "strategy"] = f"{base} ({extra})"
    if "start_time" in df:
        df = df.sort_values("start_time", kind="stable")
    counted = df.drop_duplicates(["target", "strategy", "seed"], keep="last")
    counted.attrs["n_superseded"] = len(df) - len(counted)
    return counted


def ci_halfwidth(values: Sequence[float], confidence: float = 0.95) -> float:
    """Student-t half-width of the mean's CI; NaN for fewer than two values (no spread known)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def verdict(mean: float, half: float, n: int) -> str:
    """Significant only when the paired CI excludes zero; otherwise say it is noise."""
    if n < 2:
        return "too few seeds"
    if mean - half > 0:
        return SIGNIFICANT[0]
    if mean + half < 0:
        return SIGNIFICANT[1]
    return "within noise"


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
                "train_flops": g["train_flops"].mean(),
                "train_flops_per_sample": g["train_flops_per_sample"].mean(),
                "fit_seconds": g["fit_seconds"].mean(),
                "trainable_params": g["trainable_params"].mean(),
            }
        )
    order = ["data", "train_size", "acc_mean_pct"]
    return pd.DataFrame(rows).sort_values(order, ascending=[True, True, False], ignore_index=True)


def pair_table(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Paired-by-seed differences A - B (pts) for every strategy pair within a target."""
    rows = []
    for target, s in summary.groupby("target", sort=False):
        acc = runs[runs["target"] == target].pivot(index="seed", columns="strategy", values="test_acc")
        for a, b in itertools.combinations(s["strategy"], 2):
            diff = ((acc[a] - acc[b]) * 100).dropna().to_numpy()
            n, mean, half = len(diff), diff.mean() if len(diff) else math.nan, ci_halfwidth(diff)
            rows.append((target, a, b, n, mean, mean - half, mean + half, verdict(mean, half, n)))
    cols = ["target", "a", "b", "n", "diff_mean_pts", "ci_low_pts", "ci_high_pts", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def summarize(runs: pd.DataFrame) -> Tables:
    """Pure tables from loaded runs; no MLflow needed, so tests feed synthetic frames."""
    labelled = label_runs(runs)
    summary = summary_table(labelled)
    return Tables(labelled, summary, pair_table(labelled, summary))


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of points that no cheaper-or-equal point matches in accuracy, by increasing x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -math.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return front


def findings(tables: Tables) -> list[str]:
    """Markdown bullet lines generated from the pairs: winners, significant gaps, noise."""
    p, lines = tables.pairs, []
    for target, s in tables.summary.groupby("target", sort=False):
        top = s["strategy"].iloc[0]
        tp = p[(p["target"] == target) & (p["a"] == top)]
        beaten = tp.loc[tp["verdict"] == SIGNIFICANT[0], "b"].tolist()
        tied = tp.loc[~tp["verdict"].isin(SIGNIFICANT), "b"].tolist()
        line = f"- **{target}**: highest mean is {top} ({s['acc_mean_pct'].iloc[0]:.1f}%)"
        line += f"; significantly above {', '.join(beaten)}" if beaten else ""
        line += f"; NOT distinguishable from {', '.join(tied)}" if tied else ""
        lines.append(line + ".")
    sig = p[p["verdict"].isin(SIGNIFICANT)]
    sig = sig.reindex(sig["diff_mean_pts"].abs().sort_values(ascending=False).index)
    lines += ["", f"Significant differences ({len(sig)}), largest first:"]
    for r in sig.itertuples():
        win, lose = (r.a, r.b) if r.diff_mean_pts > 0 else (r.b, r.a)
        lines.append(
            f"- {r.target}: {win} > {lose} by {abs(r.diff_mean_pts):.1f} pts (95% CI {_ci(r)}, n={r.n} paired seeds)"
        )
    noise = p[p["verdict"] == "within noise"]
    lines += ["", f"Within noise ({len(noise)}): the data cannot tell these apart:"]
    for r in noise.itertuples():
        lines.append(f"- {r.target}: {r.a} vs {r.b}: {r.diff_mean_pts:+.1f} pts (95% CI {_ci(r)}, n={r.n})")
    few = p[p["verdict"] == "too few seeds"]
    if len(few):
        lines += ["", f"Too few shared seeds to judge ({len(few)}):"]
        lines += [f"- {r.target}: {r.a} vs {r.b} (n={r.n})" for r in few.itertuples()]
    return lines


def _ci(r: Any) -> str:
    return "n/a" if r.n < 2 else f"{r.ci_low_pts:+.1f} to {r.ci_high_pts:+.1f}"


def _num(v: float, fmt: str = ".1f") -> str:
    return "n/a" if pd.isna(v) else format(v, fmt)


def _flops(v: float) -> str:
    if pd.isna(v) or v <= 0:
        return _num(v, ".3g")
    exp = min(int(math.log10(v) // 3), 5)
    return f"{v / 10 ** (3 * exp):.3g} {['', 'k', 'M', 'G', 'T', 'P'][exp]}"


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def render_markdown(experiment: str, tables: Tables, sweep_run_id: str | None) -> str:
    """The human-readable report; every claim in it is computed from the tables."""
    runs, summary, pairs = tables
    seeds = " ".join(str(s) for s in sorted(runs["seed"].unique(), key=str))
    lines = [f"# Transfer report: {experiment}", "", "## What was run", ""]
    lines += [
        f"- {len(runs)} finished job runs counted; skipped: "
        f"{runs.attrs.get('n_unfinished', 0)} job runs not FINISHED, "
        f"{runs.attrs.get('n_superseded', 0)} superseded reruns of a condition and seed; "
        "pretraining runs excluded",
        f"- {summary['target'].nunique()} targets, {len(summary)} target x strategy conditions",
        f"- seeds: {seeds}",
        f"- sweep run: {sweep_run_id or 'none found'}",
        "- accuracy = test accuracy in %; CI = 95% Student-t interval over seeds",
        "",
        "## Summary per target",
        "",
    ]
    head = ["strategy", "n", "acc mean", "std", "95% CI ±", "train FLOPs", "FLOPs/sample"]
    for target, s in summary.groupby("target", sort=False):
        rows = [
            [
                r.strategy,
                str(r.n),
                _num(r.acc_mean_pct),
                _num(r.acc_std_pct),
                _num(r.acc_ci95_pct),
                _flops(r.train_flops),
                _flops(r.train_flops_per_sample),
                _num(r.fit_seconds),
                _num(r.trainable_params, ".0f"),
            ]
            for r in s.itertuples()
        ]
        lines += [f"### {target}", ""] + _md_table([*head, "fit s", "trainable params"], rows)
        by_std = s.sort_values("acc_std_pct")
        stds = ", ".join(f"{r.strategy} {_num(r.acc_std_pct)}" for r in by_std.itertuples())
        lines += [f"Seed std (pts), lowest first: {stds}", ""]
    lines += ["## Paired comparisons (A - B, paired by seed)", ""]
    rows = [
        [r.target, r.a, r.b, str(r.n), _num(r.diff_mean_pts, "+.1f"), _ci(r), r.verdict] for r in pairs.itertuples()
    ]
    lines += _md_table(["target", "A", "B", "n", "mean diff (pts)", "95% CI", "verdict"], rows)
    caveat = f"{len(pairs)} comparisons, no multiple-comparison correction: mind marginal ones."
    lines += ["## Findings", "", f"Significant = the paired 95% CI excludes 0; {caveat}", ""]
    return "\n".join(lines + findings(tables)) + "\n"


def plot_accuracy_vs_compute(tables: Tables, path: Path) -> None:
    """Runs as faint dots, strategy means with CI bars, and the Pareto front as a step line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)

    runs, summary, _ = tables
    targets = list(dict.fromkeys(summary["target"]))
    names = sorted(summary["strategy"].unique())
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig = Figure(figsize=(5.5 * len(targets), 4.5), layout="constrained")
    for ax, target in zip(fig.subplots(1, len(targets), squeeze=False)[0], targets):
        s = summary[summary["target"] == target].reset_index(drop=True)
        r = runs[runs["target"] == target]
        for row in s.itertuples():
            c = colours[row.strategy]
            pts = r[r["strategy"] == row.strategy]
            ax.scatter(pts["train_flops"], pts["test_acc"] * 100, color=c, alpha=0.3, s=12)
            err = 0 if pd.isna(row.acc_ci95_pct) else row.acc_ci95_pct
            label = f"{row.strategy} (n={row.n})"
            ax.errorbar(row.train_flops, row.acc_mean_pct, err, fmt="o", c=c, capsize=4, label=label)
        ok = s[s["train_flops"] > 0].reset_index(drop=True)
        front = ok.iloc[pareto_front(ok["train_flops"].tolist(), ok["acc_mean_pct"].tolist())]
        if len(front):
            fx, fy = front["train_flops"], front["acc_mean_pct"]
            ax.step(fx, fy, "k--", where="post", lw=1, label="Pareto front (means)")
            ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="k")
            ax.set_xscale("log")
        ax.set(title=target, xlabel="training FLOPs per run", ylabel="test accuracy (%)")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def write_report(
    experiment: str,
    out_dir: Path,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Write report.md, summary.csv, pairs.csv and the plot; log them under report/ on the sweep."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    runs = load_runs(client, experiment)
    if runs.empty:
        raise ConfigError(f"experiment {experiment!r} has no finished job runs; run a sweep first")
    if parent_run_id is None:
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        sweeps = client.search_runs(
            [exp_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1, order_by=["start_time DESC"]
        )
        parent_run_id = sweeps[0].info.run_id if sweeps else None
    tables = summarize(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("report.md", "summary.csv", "pairs.csv", "accuracy_vs_compute.png")]
    paths[0].write_text(render_markdown(experiment, tables, parent_run_id))
    tables.summary.to_csv(paths[1], index=False)
    tables.pairs.to_csv(paths[2], index=False)
    plot_accuracy_vs_compute(tables, paths[3])
    if parent_run_id is not None:
        for p in paths:
            client.log_artifact(parent_run_id, str(p), "report")
    return paths[0]
