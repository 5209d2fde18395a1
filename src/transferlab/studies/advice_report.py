"""The report's check of `transferlab advise` against the sweep it advised on.

Per measure, the Kendall rank correlation between its score and the test accuracy the sweep's
probes reached at each (candidate, stage); per target, whether the advised strategy had the
highest mean or was within noise of it (the paired verdicts of the report's own tables).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from transferlab import tags as tag_names
from transferlab.studies.stats import SIGNIFICANT, WITHIN_NOISE
from transferlab.studies.transferability import MEASURES
from transferlab.tags import ADVISE as TAG
from transferlab.tags import candidate_label


def load_advice(client: Any, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(advice per target, scores per target x candidate x stage) from a study's advise runs;
    a target advised twice keeps its latest run."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame(), pd.DataFrame()
    found = client.search_runs(
        [exp.experiment_id],
        tag_names.role_query(tag_names.ROLE_ADVISE) + " and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    advice, scores, seen = [], [], set()
    for run in sorted(found, key=lambda r: -r.info.start_time):
        tags, metrics = run.data.tags, run.data.metrics
        target = tags.get(TAG + "target")
        if target is None or target in seen:
            continue
        seen.add(target)
        advice.append(
            {
                "target": target,
                "size": tags.get(TAG + "size"),
                "domain": tags.get(TAG + "domain"),
                "best_stage": tags.get(TAG + "best_stage"),
                "strategies": tags.get(TAG + "strategies", ""),
                "per_class": metrics.get("advise/per_class"),
                "loss_pts": metrics.get("advise/last_stage_loss_pts"),
                "knn_gain_pts": metrics.get("advise/last_stage_knn_gain_over_random_pts"),
                "seconds": metrics.get("advise/seconds"),
            }
        )
        order = (tags.get(TAG + "stages") or "").split(",")
        for key, value in metrics.items():
            parts = key.split("/")
            if parts[0] != "advise" or len(parts) < 4 or parts[-1] not in (*MEASURES, "params"):
                continue
            stage = parts[-2]
            scores.append(
                {
                    "target": target,
                    "candidate": "/".join(parts[1:-2]),
                    "stage": stage,
                    "order": order.index(stage) if stage in order else len(order),
                    "measure": parts[-1],
                    "score": value,
                }
            )
    return pd.DataFrame(advice), with_size_baseline(pd.DataFrame(scores))


SIZE_BASELINE = "bigger ImageNet model first"


def with_size_baseline(scores: pd.DataFrame) -> pd.DataFrame:
    """The target-agnostic baseline beside the measures (Singh et al. 2025: tau_w 0.91 on the
    standard 11-model benchmark): ImageNet candidates ranked by parameter count, every other
    source below them. Replaces the raw `params` rows."""
    if scores.empty or "params" not in set(scores["measure"]):
        return scores
    size = scores[scores["measure"] == "params"].copy()
    imagenet = size["candidate"].str.endswith(":pretrained")
    size["score"] = size["score"].where(imagenet, -1.0)
    size["measure"] = SIZE_BASELINE
    return pd.concat([scores[scores["measure"] != "params"], size], ignore_index=True)


def probe_accuracy(runs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy (%) of the sweep's probes (freeze_depth=all) per target, candidate and
    stage cut at (truncate_after; none = the candidate's last scored stage)."""
    col = "params.finetune.freeze_depth"
    if runs.empty or col not in runs or scores.empty:
        return pd.DataFrame(columns=["target", "candidate", "stage", "acc"])
    probes = runs[runs[col].astype(str) == "all"].copy()
    probes["candidate"] = [
        candidate_label(str(n), str(w))
        for n, w in zip(probes["params.backbone.name"], probes["params.backbone.weights"])
    ]
    last = scores.sort_values("order").groupby(["target", "candidate"])["stage"].last()
    cut = probes.get("params.finetune.truncate_after", pd.Series("None", index=probes.index)).astype(str)
    if "truncated_at" in probes:  # the stage a share of the depth (75%) resolved to
        cut = probes["truncated_at"].where(probes["truncated_at"].notna(), cut).astype(str)
    probes["stage"] = [
        last.get((t, c), "?") if s in ("None", "null", "nan") else s
        for t, c, s in zip(probes["target"], probes["candidate"], cut)
    ]
    acc = probes.groupby(["target", "candidate", "stage"])["test_acc"].mean() * 100
    return acc.rename("acc").reset_index()


def rank_agreement(scores: pd.DataFrame, accuracy: pd.DataFrame) -> pd.DataFrame:
    """Kendall tau per measure and target over (candidate, stage) points, plus a pooled row that
    counts concordant and discordant pairs within targets only (targets differ in difficulty)."""
    if scores.empty or accuracy.empty:
        return pd.DataFrame()
    joined = scores.merge(accuracy, on=["target", "candidate", "stage"])
    rows = []
    for measure, per_measure in joined.groupby("measure"):
        concordant = discordant = pairs = 0
        for target, g in per_measure.groupby("target"):
            x, y = g["score"].to_numpy(), g["acc"].to_numpy()
            tau = stats.kendalltau(x, y).statistic if len(g) >= 2 else np.nan
            rows.append({"measure": measure, "target": target, "points": len(g), "tau": tau})
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
                    concordant += sign > 0
                    discordant += sign < 0
                    pairs += 1
        pooled = (concordant - discordant) / pairs if pairs else np.nan
        rows.append({"measure": measure, "target": "all (within-target pairs)", "points": pairs, "tau": pooled})
    return pd.DataFrame(rows)


def _matches(label: str, strategy: str) -> bool:
    return label == strategy or label.startswith(strategy + " (")


def _wall_seconds(runs: pd.DataFrame) -> float:
    """Sum of the job runs' MLflow lifetimes (data, fit, test, logging; not process start-up)."""
    if "end_time" not in runs or runs.empty:
        return np.nan
    return float((runs["end_time"] - runs["start_time"]).sum() / 1000)


def outcomes(advice: pd.DataFrame, runs: pd.DataFrame, summary: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per advised target: the winner, the best advised strategy and whether it won, tied within
    noise (paired CI includes 0) or lost significantly."""
    rows = []
    for a in advice.itertuples():
        s = summary[summary["target"] == a.target]
        if s.empty:
            continue
        winner = s.iloc[0]
        advised = s[[any(_matches(x, k) for k in a.strategies.split(",")) for x in s["strategy"]]]
        if advised.empty:
            outcome, pick, gap = "not in the sweep", "-", np.nan
        else:
            pick = advised.iloc[0]
            gap = winner["acc_mean_pct"] - pick["acc_mean_pct"]
            if pick["strategy"] == winner["strategy"]:
                outcome = "won"
            else:
                p = pairs[(pairs["target"] == a.target)]
                p = p[p[["a", "b"]].isin([winner["strategy"], pick["strategy"]]).all(axis=1)]
                verdict = p["verdict"].iloc[0] if len(p) else "not paired"
                if verdict in SIGNIFICANT:
                    outcome = "lost (significant)"
                elif verdict == WITHIN_NOISE:
                    outcome = "within noise of the winner"
                else:
                    outcome = f"behind the winner, not judged ({verdict})"
            pick = pick["strategy"]
        rows.append(
            {
                "target": a.target,
                "advice": f"{a.size} + {a.domain}: {a.strategies.replace(',', ' or ')}",
                "numbers": f"{a.per_class:.0f}/class; last stage {-a.loss_pts:+.1f} pts vs {a.best_stage}"
                + ("" if pd.isna(a.knn_gain_pts) else f", k-NN {a.knn_gain_pts:+.1f} pts vs random-init"),
                "advise_s": a.seconds,
                "sweep_s": _wall_seconds(runs[runs["target"] == a.target]),
                "winner": f"{winner['strategy']} ({winner['acc_mean_pct']:.1f}%)",
                "advised": pick,
                "gap_pts": gap,
                "outcome": outcome,
            }
        )
    return pd.DataFrame(rows)


def advice_report(client: Any, experiment: str, tables: Any) -> str:
    """The report's section for a study with advise runs ("" without): `tables` is report.Tables."""
    advice, scores = load_advice(client, experiment)
    return "\n".join(advice_markdown(advice, scores, tables.runs, tables.summary, tables.pairs))


def advice_markdown(
    advice: pd.DataFrame, scores: pd.DataFrame, runs: pd.DataFrame, summary: pd.DataFrame, pairs: pd.DataFrame
) -> list[str]:
    """The report section: advice next to outcome, then how well each measure ranked the probes."""
    if advice.empty:
        return []
    lines = ["## Advice (transferlab advise) vs outcome", ""]
    out = outcomes(advice, runs, summary, pairs)
    head = [
        "target",
        "advice",
        "numbers behind it",
        "advise s",
        "sweep s",
        "ratio",
        "winner",
        "advised",
        "gap",
        "outcome",
    ]
    rows = [
        [
            r.target,
            r.advice,
            r.numbers,
            f"{r.advise_s:.1f}",
            f"{r.sweep_s:.0f}",
            "n/a" if not r.sweep_s > 0 else f"{100 * r.advise_s / r.sweep_s:.1f}%",
            r.winner,
            r.advised,
            "n/a" if pd.isna(r.gap_pts) else f"{r.gap_pts:.1f}",
            r.outcome,
        ]
        for r in out.itertuples()
    ]
    lines += _table(head, rows)
    lines += [
        "advise s: scoring the target (features + measures; decoding the data beforehand, which the "
        "sweep's jobs then reuse, excluded); sweep s: the target's job runs summed "
        "(MLflow run lifetimes; process start-up excluded from both). gap: winner's mean - advised mean, pts.",
        "",
    ]
    taus = rank_agreement(scores, probe_accuracy(runs, scores))
    lines += ["### Rank agreement: measure vs probe accuracy reached (Kendall tau)", ""]
    if taus.empty:
        return lines + ["No probe runs (finetune.freeze_depth=all) at advised stages: nothing to correlate.", ""]
    rows = [
        [r.measure, r.target, str(r.points), "n/a" if pd.isna(r.tau) else f"{r.tau:+.2f}"] for r in taus.itertuples()
    ]
    lines += _table(["measure", "target", "points (pairs for all)", "tau"], rows)
    return lines + ["Few points per target make single-target tau coarse (2 points: +1 or -1).", ""]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]
