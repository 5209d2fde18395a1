"""Accuracy against training FLOPs: one panel per target in a grid, one legend outside the panels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

MARKERS = "osD^vP*Xhp<>"
PARETO_LABEL = "Pareto front (ringed):\nno cheaper strategy\nhas a higher mean"
SPREAD = 0.04  # log10 units between strategies that share a FLOPs value (x1.1 per step)


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of points that no cheaper-or-equal point matches in accuracy, by increasing x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -math.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return front


def spread_equal_x(x: Sequence[float], rel: float = 0.01) -> list[float]:
    """Multiplicative offsets that pull apart points within `rel` of each other in x, so that
    strategies with equal FLOPs (scratch and fine-tune) are both visible; 1.0 for loners."""
    offsets = [1.0] * len(x)
    order = sorted(range(len(x)), key=lambda i: x[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and x[i] <= x[groups[-1][0]] * (1 + rel):
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        for k, i in enumerate(group):
            offsets[i] = 10 ** (SPREAD * (k - (len(group) - 1) / 2))
    return offsets


TEACHER_LABEL = "distilled: + the teacher's own training"


def _teacher_cost(ax: Any, x: float, row: Any, colour: str, marker: str) -> None:
    """Distillation: x already includes the teacher's forwards; a hollow twin further right adds
    the teacher's own training, joined by a dotted line (the teacher may be shared by many runs)."""
    extra = getattr(row, "teacher_fit_flops", 0.0)
    if pd.isna(extra) or extra <= 0:
        return
    ax.plot([x, x + extra], [row.acc_mean_pct] * 2, ls=":", c=colour, lw=1)
    ax.scatter([x + extra], [row.acc_mean_pct], marker=marker, facecolors="none", edgecolors=colour, s=49)


def plot_accuracy_vs_compute(tables: Any, path: Path) -> None:
    accuracy_figure(tables).savefig(path, dpi=110)


def accuracy_figure(tables: Any) -> Any:
    """Runs as faint dots, strategy means with clipped CI bars, Pareto-front means ringed."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)
    from matplotlib.lines import Line2D

    runs, summary = tables.runs, tables.summary
    targets = list(dict.fromkeys(summary["target"]))
    names = sorted(summary["strategy"].unique())
    style = {n: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, n in enumerate(names)}
    cols = 1 if len(targets) == 1 else 2
    rows = math.ceil(len(targets) / cols)
    fig = Figure(figsize=(5.2 * cols + 3.2, 3.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(targets) :]:
        ax.set_axis_off()
    for ax, target in zip(axes, targets):
        s = summary[summary["target"] == target].reset_index(drop=True)
        r = runs[runs["target"] == target]
        shift = dict(zip(s["strategy"], spread_equal_x(s["train_flops"].fillna(0).tolist())))
        for row in s.itertuples():
            colour, marker = style[row.strategy]
            x = row.train_flops * shift[row.strategy]
            pts = r[r["strategy"] == row.strategy]
            ax.scatter([x] * len(pts), pts["test_acc"] * 100, color=colour, marker=marker, alpha=0.3, s=14)
            low, high = row.acc_ci_low_pct, row.acc_ci_high_pct
            err = [[0], [0]] if pd.isna(low) else [[row.acc_mean_pct - low], [high - row.acc_mean_pct]]
            ax.errorbar(x, row.acc_mean_pct, err, fmt=marker, c=colour, ms=7, capsize=4)
            _teacher_cost(ax, x, row, colour, marker)
        ok = s[s["train_flops"] > 0].reset_index(drop=True)
        front = ok.iloc[pareto_front(ok["train_flops"].tolist(), ok["acc_mean_pct"].tolist())]
        if len(front):
            fx = [f * shift[n] for f, n in zip(front["train_flops"], front["strategy"])]
            ax.step(fx, front["acc_mean_pct"], "k--", where="post", lw=1)
            ax.scatter(fx, front["acc_mean_pct"], s=230, facecolors="none", edgecolors="k", lw=1.2)
            ax.set_xscale("log")
        ax.set_title(target, fontsize="medium")
        ax.set(xlabel="training FLOPs per run (log)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=style[n][0], marker=style[n][1], ls="", ms=7, label=n) for n in names]
    handles += [
        Line2D([], [], color="grey", marker="o", ls="", alpha=0.3, ms=4, label="one run (seed)"),
        Line2D([], [], color="grey", marker="|", ls="", ms=10, label="mean, 95% CI over seeds"),
        Line2D([], [], color="k", marker="o", mfc="none", ls="--", ms=12, lw=1, label=PARETO_LABEL),
    ]
    if (tables.summary.get("teacher_fit_flops", pd.Series(dtype=float)).fillna(0) > 0).any():
        handles.append(Line2D([], [], color="grey", marker="o", mfc="none", ls=":", ms=7, label=TEACHER_LABEL))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    fig.suptitle("Test accuracy vs training compute (equal-FLOPs strategies drawn side by side)", fontsize="medium")
    return fig
