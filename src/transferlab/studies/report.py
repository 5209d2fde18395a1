"""Accuracy-vs-compute report over a study's MLflow runs.

Means and 95% confidence intervals over seeds, paired comparisons (Holm-corrected) that say
plainly which differences are within noise, findings in words (the winner and the cheapest
strategy within noise of it), and a Pareto plot of accuracy against training FLOPs. The tables
themselves (loading, labelling, statistics) are in tables.py; this module puts them into words.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transferlab import tags as tag_names
from transferlab.errors import ConfigError
from transferlab.studies.advice_report import advice_report
from transferlab.studies.halving_report import halving_section, load_pruned
from transferlab.studies.plot import plot_accuracy_vs_compute
from transferlab.studies.stats import MIN_SEEDS, SIGNIFICANT, WITHIN_NOISE
from transferlab.studies.tables import Tables, load_runs, summarize

# Run tags (identity.environment_tags) that say which software produced the numbers.
MAX_NOTE = 8000  # MLflow's tag value limit (mlflow/utils/validation.py)


def _verdict_for(pairs: pd.DataFrame, target: str, winner: str, other: str) -> str:
    """The pair's verdict read from the winner's side (A = winner)."""
    row = pairs[(pairs["target"] == target) & (pairs[["a", "b"]].isin([winner, other]).all(axis=1))].iloc[0]
    if row["a"] == winner or row["verdict"] not in SIGNIFICANT:
        return row["verdict"]
    return SIGNIFICANT[1 - SIGNIFICANT.index(row["verdict"])]


def _cost(row: Any, best: Any) -> str:
    ratio = row.train_flops / best.train_flops if best.train_flops > 0 else math.nan
    # a probe on cached features costs ~1e-4 of fine-tuning: two decimals would print 0.00x
    small = not pd.isna(ratio) and 0 < ratio < 0.01
    shown = np.format_float_positional(ratio, precision=1, fractional=False) if small else _num(ratio, ".2f")
    return f"{row.strategy}: {shown}x the FLOPs, {row.acc_mean_pct - best.acc_mean_pct:+.1f} pts"


def target_findings(target: str, s: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """One target in words: the best mean, what it beats, and the cheapest strategy the data
    cannot tell apart from it, with its cost ratio (the trade-off a user is choosing)."""
    best, others = s.iloc[0], s.iloc[1:]
    line = f"- **{target}**: highest mean {best.strategy} {best.acc_mean_pct:.1f}%"
    verdicts = {o.strategy: _verdict_for(pairs, target, best.strategy, o.strategy) for o in others.itertuples()}
    beaten = [n for n, v in verdicts.items() if v == SIGNIFICANT[0]]
    tied = others[others["strategy"].isin([n for n, v in verdicts.items() if v == WITHIN_NOISE])]
    unjudged = [n for n, v in verdicts.items() if v not in (*SIGNIFICANT, WITHIN_NOISE)]
    line += f"; significantly above {', '.join(beaten)}" if beaten else ""
    line += f"; within noise of {', '.join(tied['strategy'])}" if len(tied) else ""
    line += f"; not judged ({', '.join(f'{n}: {verdicts[n]}' for n in unjudged)})" if unjudged else ""
    cheaper = tied[tied["train_flops"] < best.train_flops].sort_values("train_flops")
    if len(cheaper):
        line += f". Cheapest within noise of it: {_cost(cheaper.iloc[0], best)}"
    elif len(tied) or beaten:
        line += ". Nothing cheaper is within noise of it"
    cheapest = s.sort_values("train_flops").iloc[0]
    if cheapest.strategy != best.strategy and (not len(cheaper) or cheapest.strategy != cheaper.iloc[0].strategy):
        line += f". Cheapest overall: {_cost(cheapest, best)} ({verdicts[cheapest.strategy]})"
    return line + "."


def findings(tables: Tables) -> list[str]:
    """Markdown bullet lines generated from the pairs: per-target trade-offs, then every pair."""
    p, lines = tables.pairs, []
    for target, s in tables.summary.groupby("target", sort=False):
        lines.append(target_findings(target, s, p))
    sig = p[p["verdict"].isin(SIGNIFICANT)]
    sig = sig.reindex(sig["diff_mean_pts"].abs().sort_values(ascending=False).index)
    lines += ["", f"Significant differences ({len(sig)} of {len(p)} tested), largest first:"]
    for r in sig.itertuples():
        win, lose = (r.a, r.b) if r.diff_mean_pts > 0 else (r.b, r.a)
        lines.append(
            f"- {r.target}: {win} > {lose} by {abs(r.diff_mean_pts):.1f} pts "
            f"(95% CI {_ci(r)}, Holm p={_p(r.p_holm)}, n={r.n} paired seeds)"
        )
    noise = p[p["verdict"] == WITHIN_NOISE]
    lines += ["", f"Within noise ({len(noise)}): not significant after Holm's correction; cannot tell apart:"]
    for r in noise.itertuples():
        lines.append(
            f"- {r.target}: {r.a} vs {r.b}: {r.diff_mean_pts:+.1f} pts "
            f"(95% CI {_ci(r)}, Holm p={_p(r.p_holm)}, n={r.n})"
        )
    other = p[~p["verdict"].isin([*SIGNIFICANT, WITHIN_NOISE])]
    if len(other):
        lines += ["", f"No verdict ({len(other)}): too few seeds, or an interval that means nothing:"]
        lines += [f"- {r.target}: {r.a} vs {r.b}: {r.verdict}" for r in other.itertuples()]
    return lines


def _p(v: float) -> str:
    return "n/a" if pd.isna(v) else f"{v:.2g}"


def _ci(r: Any) -> str:
    return "n/a" if r.n < 2 else f"{r.ci_low_pts:+.1f} to {r.ci_high_pts:+.1f}"


def _num(v: float, fmt: str = ".1f") -> str:
    return "n/a" if pd.isna(v) else format(v, fmt)


def _flops(v: float) -> str:
    if pd.isna(v) or v <= 0:
        return _num(v, ".3g")
    exp = min(int(math.log10(v) // 3), 5)
    return f"{v / 10 ** (3 * exp):.3g} {['', 'k', 'M', 'G', 'T', 'P'][exp]}"


def results_table(summary: pd.DataFrame) -> list[str]:
    """Targets x strategies, `mean (CI low-high)` in %, then FLOPs per sample: the table the
    README quotes and the sweep's parent run shows as its description."""
    order = summary.groupby("strategy")["train_flops_per_sample"].mean().sort_values(ascending=False, kind="stable")
    wide = summary.set_index(["target", "strategy"])
    rows = []
    for target in dict.fromkeys(summary["target"]):
        cells = []
        for name in order.index:
            if (target, name) not in wide.index:
                cells.append("")
                continue
            r = wide.loc[(target, name)]
            cells.append(f"{r.acc_mean_pct:.1f} ({_interval(r.acc_ci_low_pct, r.acc_ci_high_pct)})")
        rows.append([target, *cells])
    rows.append(["training FLOPs / sample", *(_flops(v) for v in order)])
    return _md_table(["target", *order.index], rows)


def _interval(low: float, high: float) -> str:
    return "n/a" if pd.isna(low) else f"{low:.1f} to {high:.1f}"


def software(runs: pd.DataFrame) -> str:
    """Versions the runs were made with (from their tags); mixed versions are listed, not hidden."""
    parts = []
    for col in [c for c in runs.columns if c.startswith("version.")]:
        values = sorted({str(v)[:12] if col == "version.git" else str(v) for v in runs[col].dropna()})
        if values:
            parts.append(f"{col[8:]} {' / '.join(values)}{' (mixed)' if len(values) > 1 else ''}")
    return ", ".join(parts) or "not recorded (runs carry no version tags)"


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
        "- accuracy = test accuracy in %; CI = 95% Student-t interval over seeds, clipped to [0, 100]",
        "- cost per run (mean over seeds): train FLOPs = forward + backward over every phase and epoch; "
        "FLOPs/sample = that total / training samples seen; eval FLOPs = validation and test forward passes",
        "- a probe on cached frozen features pays for its head only; the one-off forward that built "
        "the features is the cache build column, summed over the condition's runs (it is paid once)",
        f"- software: {software(runs)}",
        "",
        "## Results",
        "",
        *results_table(summary),
        "## Summary per target",
        "",
    ]
    head = ["strategy", "n", "acc mean", "std", "95% CI", "train FLOPs (run)", "FLOPs/sample", "eval FLOPs"]
    for target, s in summary.groupby("target", sort=False):
        rows = [
            [
                r.strategy,
                str(r.n),
                _num(r.acc_mean_pct),
                _num(r.acc_std_pct),
                _interval(r.acc_ci_low_pct, r.acc_ci_high_pct),
                _flops(r.train_flops),
                _flops(r.train_flops_per_sample),
                _flops(r.eval_flops),
                _flops(r.cache_build_flops),
                _num(r.fit_seconds),
                _num(r.trainable_params, ".0f"),
            ]
            for r in s.itertuples()
        ]
        test = f" ({_num(s['test_size'].min(), '.0f')} test images: 1 image = {_num(100 / s['test_size'].min())} pts)"
        lines += [f"### {target}{test if s['test_size'].min() > 0 else ''}", ""]
        lines += _md_table([*head, "cache build FLOPs (once)", "fit s", "trainable params"], rows)
        by_std = s.sort_values("acc_std_pct")
        stds = ", ".join(f"{r.strategy} {_num(r.acc_std_pct)}" for r in by_std.itertuples())
        lines += [f"Seed std (pts), lowest first: {stds}", ""]
    lines += ["## Paired comparisons (A - B, paired by seed)", ""]
    rows = [
        [r.target, r.a, r.b, str(r.n), _num(r.diff_mean_pts, "+.1f"), _ci(r), _p(r.p_holm), r.verdict]
        for r in pairs.itertuples()
    ]
    lines += _md_table(["target", "A", "B", "n", "mean diff (pts)", "95% CI", "Holm p", "verdict"], rows)
    tested = int(pairs["p"].notna().sum())
    lines += [
        "## Findings",
        "",
        f"Significant = paired t-test over seeds, Holm-corrected over the {tested} comparisons tested in this "
        f"study, p < 0.05 (the 95% CIs shown are per comparison, uncorrected). No verdict with fewer than "
        f"{MIN_SEEDS} paired seeds, when every seed gives the same difference, or when the interval is "
        "narrower than one test image. Cost ratios are training FLOPs relative to the highest mean.",
        "",
    ]
    return "\n".join(lines + findings(tables)) + "\n"


def run_description(experiment: str, tables: Tables) -> str:
    """The sweep's parent-run description (the MLflow UI renders `mlflow.note.content` as markdown)."""
    lines = [f"**{experiment}**: test accuracy %, mean (95% CI) over seeds", "", *results_table(tables.summary)]
    lines += [target_findings(t, s, tables.pairs) for t, s in tables.summary.groupby("target", sort=False)]
    lines += ["", "Full report: artifacts `report/report.md` and `report/accuracy_vs_compute.png`."]
    return "\n".join(lines)[:MAX_NOTE]


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The sweep's parent-run metrics per target: the best mean over seeds of any strategy, for
    test and for validation accuracy (%), so the parent's row and page show results."""
    metrics = {}
    for _, s in summary.groupby("target", sort=False):
        first = s.iloc[0]
        for column, what in (("acc_mean_pct", "test_acc_pct"), ("val_acc_mean_pct", "val_acc_pct")):
            if s[column].notna().any():
                metrics[tag_names.summary_metric(first["data"], first["train_size"], what)] = s[column].max()
    return metrics


def write_report(
    experiment: str,
    out_dir: Path,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Write report.md, summary.csv, pairs.csv and the plot; log them under report/ on the sweep."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri)
    runs = load_runs(client, experiment)
    if runs.empty:
        raise ConfigError(f"experiment {experiment!r} has no finished job runs; run a sweep first")
    if parent_run_id is None:
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        sweeps = client.search_runs(
            [exp_id], tag_names.role_query(tag_names.ROLE_SWEEP), max_results=1, order_by=["start_time DESC"]
        )
        parent_run_id = sweeps[0].info.run_id if sweeps else None
    tables = summarize(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("report.md", "summary.csv", "pairs.csv", "accuracy_vs_compute.png")]

    pruned = halving_section(load_pruned(client, experiment), runs)  # a halving sweep's pruned configurations
    text = render_markdown(experiment, tables, parent_run_id) + pruned + advice_report(client, experiment, tables)
    paths[0].write_text(text)
    tables.summary.to_csv(paths[1], index=False)
    tables.pairs.to_csv(paths[2], index=False)
    plot_accuracy_vs_compute(tables, paths[3])
    if parent_run_id is not None:
        for p in paths:
            client.log_artifact(parent_run_id, str(p), "report")
        client.set_tag(parent_run_id, "mlflow.note.content", run_description(experiment, tables))
        now = int(time.time() * 1000)
        best = [Metric(k, float(v), now, 0) for k, v in summary_metrics(tables.summary).items()]
        client.log_batch(parent_run_id, metrics=best)
    return paths[0]
