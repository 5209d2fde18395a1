"""Report math on synthetic runs, plus one end-to-end report from a temporary MLflow store."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats

from transferlab.errors import ConfigError
from transferlab.studies.plot import accuracy_figure, pareto_front, spread_equal_x
from transferlab.studies.report import render_markdown, summarize, summary_metrics, write_report
from transferlab.studies.stats import ci_halfwidth, holm, verdict


def _run(strategy: str, seed: int, acc: float, data: str = "similar", size: int = 30, flops=None, **params):
    """One loaded-run row as `load_runs` returns it; condition = all params except the seed."""
    p = {"data.name": data, "finetune.strategy": strategy, "optim.lr": "0.01"} | params
    flops = flops or (1e12 if strategy == "fine_tune" else 3e11)
    return {
        "run_id": f"{strategy}-{seed}-{acc}",
        "condition_hash": repr(sorted(p.items())),
        "seed": seed,
        "test_acc": acc,
        "train_size": size,
        "train_flops": flops,
        "train_flops_per_sample": 1e9,
        "fit_seconds": 2.0,
        "trainable_params": 1000,
    } | {f"params.{k}": v for k, v in p.items()}


def _row(summary: pd.DataFrame, strategy: str) -> pd.Series:
    return summary.set_index("strategy").loc[strategy]


def test_summary_mean_and_t_interval():
    runs = pd.DataFrame([_run("probe", s, a) for s, a in enumerate([0.8, 0.9, 1.0])])
    row = _row(summarize(runs).summary, "probe")
    assert row["n"] == 3
    assert row["acc_mean_pct"] == pytest.approx(90.0)
    assert row["acc_std_pct"] == pytest.approx(10.0)
    assert row["acc_ci95_pct"] == pytest.approx(stats.t.ppf(0.975, 2) * 10.0 / math.sqrt(3))
    assert math.isnan(ci_halfwidth([0.5]))


def test_single_seed_has_no_interval():
    runs = pd.DataFrame([_run("probe", 0, 0.7), _run("scratch", 0, 0.6)])
    tables = summarize(runs)
    assert tables.summary["acc_ci95_pct"].isna().all()
    assert tables.pairs["verdict"].tolist() == ["too few seeds (n=1 < 3)"]


def test_paired_verdicts_separate_signal_from_noise():
    base = [0.60, 0.70, 0.80, 0.65]
    small, large = [0, 0.01, -0.01, 0.005], [0.2, -0.15, 0.1, -0.12]
    rows = [_run("scratch", s, a) for s, a in enumerate(base)]
    rows += [_run("fine_tune", s, a + 0.10 + e) for s, (a, e) in enumerate(zip(base, small))]
    rows += [_run("probe", s, a + e) for s, (a, e) in enumerate(zip(base, large))]
    runs = pd.DataFrame(rows)
    pairs = summarize(runs).pairs.set_index(["a", "b"])
    ft = pairs.loc[("fine_tune", "scratch")]
    assert ft["verdict"] == "A > B (significant)"
    assert ft["diff_mean_pts"] == pytest.approx(10.125)
    assert ft["n"] == 4
    noisy = pairs.loc[("probe", "scratch")]
    assert noisy["verdict"] == "within noise"
    assert noisy["ci_low_pts"] < 0 < noisy["ci_high_pts"]


def test_verdict_sign_and_edges():
    assert verdict([-5, -4, -6], 0.01) == "B > A (significant)"
    assert verdict([5, 4, 6], 0.01) == "A > B (significant)"
    assert verdict([5, 4, 6], 0.2) == "within noise"  # the Holm-adjusted p decides, not the raw CI
    assert verdict([30, 40], 0.001).startswith("too few seeds")  # n = 2: never a verdict
    assert verdict([5.6, 5.6, 5.6], math.nan).startswith("degenerate")


def test_quantised_interval_is_no_verdict():
    """18 test images: accuracy moves in steps of 5.6 pts; a CI narrower than one step is an artefact."""
    step = 100 / 18
    diffs = [step] * 9 + [2 * step]
    assert ci_halfwidth(diffs) < step
    assert verdict(diffs, 1e-6, quantum=step).startswith("quantised")
    assert verdict(diffs, 1e-6, quantum=100 / 1000) == "A > B (significant)"


def test_holm_adjustment_by_hand():
    # sorted p: 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.02, math.nan])  # untested pairs do not count as tests
    assert adjusted[0] == pytest.approx(0.02)
    assert math.isnan(adjusted[1])


def test_many_comparisons_make_a_marginal_difference_noise():
    # probe - scratch = +4, +5, +6 pts: p = 0.013 alone, significant; among 6 strategies (15 pairs) it is not.
    rows = [_run("scratch", s, 0.5) for s in range(3)] + [
        _run("probe", s, 0.5 + d) for s, d in enumerate([0.04, 0.05, 0.06])
    ]
    alone = summarize(pd.DataFrame(rows)).pairs
    assert alone["p"].iloc[0] == pytest.approx(stats.ttest_1samp([4, 5, 6], 0).pvalue)
    assert alone["verdict"].iloc[0] == "A > B (significant)"
    noise = [0.0, 0.3, -0.3]
    rows += [_run(f"other{k}", s, 0.5 + noise[(s + k) % 3]) for k in range(4) for s in range(3)]
    pairs = summarize(pd.DataFrame(rows)).pairs.set_index(["a", "b"])
    assert pairs.loc[("probe", "scratch"), "verdict"] == "within noise"
    assert pairs.loc[("probe", "scratch"), "p_holm"] > 0.05


def test_accuracy_interval_is_clipped_to_100():
    row = _row(summarize(pd.DataFrame([_run("probe", s, a) for s, a in enumerate([1.0, 1.0, 0.97])])).summary, "probe")
    assert row["acc_mean_pct"] + row["acc_ci95_pct"] > 100
    assert row["acc_ci_high_pct"] == 100
    assert row["acc_ci_low_pct"] == pytest.approx(row["acc_mean_pct"] - row["acc_ci95_pct"])


def _tradeoff_tables():
    rows = [_run("fine_tune", s, a) for s, a in enumerate([0.80, 0.70, 0.90])]
    rows += [_run("probe", s, a, flops=3.1e11) for s, a in enumerate([0.70, 0.72, 0.74])]
    rows += [_run("scratch", s, a, flops=1e12) for s, a in enumerate([0.81, 0.71, 0.86])]
    rows += [_run("tiny", s, a, flops=1e10) for s, a in enumerate([0.30, 0.31, 0.33])]
    return summarize(pd.DataFrame(rows))


def test_findings_name_winner_and_cheapest_within_noise_with_cost_ratio():
    text = render_markdown("t", _tradeoff_tables(), None)
    (line,) = [x for x in text.splitlines() if x.startswith("- **similar / 30 train**")]
    assert "highest mean fine_tune 80.0%" in line
    assert "Cheapest within noise of it: probe: 0.31x the FLOPs, -8.0 pts" in line
    assert "Cheapest overall: tiny: 0.01x the FLOPs, -48.7 pts (A > B (significant))" in line


def test_a_cost_ratio_below_a_hundredth_keeps_a_significant_digit():
    tables = _tradeoff_tables()
    tables.summary.loc[tables.summary["strategy"] == "tiny", "train_flops"] = 2.5e8  # 2.5e8 / 1e12
    text = render_markdown("t", tables, None)
    (line,) = [x for x in text.splitlines() if x.startswith("- **similar / 30 train**")]
    assert "Cheapest overall: tiny: 0.0003x the FLOPs" in line


def test_imagefolder_target_is_named_after_its_folder():
    rows = [_run("probe", s, 0.5, data="imagefolder", **{"data.root": "/data/leaves/"}) for s in range(3)]
    assert summarize(pd.DataFrame(rows)).summary["target"].tolist() == ["leaves / 30 train"]


def test_report_records_software_versions():
    runs = pd.DataFrame(
        [
            _run("probe", s, 0.5) | {"version.torch": "2.9.1", "version.timm": t}
            for s, t in enumerate(["1.0.1", "1.0.1", "1.0.2"])
        ]
    )
    text = render_markdown("t", summarize(runs), None)
    assert "software: torch 2.9.1, timm 1.0.1 / 1.0.2 (mixed)" in text


def test_equal_flops_points_are_pulled_apart():
    offsets = spread_equal_x([1e9, 1e9, 5e9, 1.001e9])
    assert len({offsets[0], offsets[1], offsets[3]}) == 3
    assert offsets[2] == 1.0


def test_plot_is_a_grid_with_the_legend_outside_every_panel():
    tables = _tradeoff_tables()
    runs = pd.concat([tables.runs.assign(target=f"t{k}") for k in range(4)])
    summary = pd.concat([tables.summary.assign(target=f"t{k}") for k in range(4)])
    fig = accuracy_figure(tables._replace(runs=runs, summary=summary))
    width, height = fig.get_size_inches()
    assert width < 2 * height  # 2 x 2, not one 4-panel row
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4
    assert all(not box.overlaps(ax.get_window_extent(renderer)) for ax in panels)
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("Pareto front" in t for t in labels)
    assert {"fine_tune", "probe", "scratch", "tiny"} <= set(labels)


def test_pairs_only_within_a_target_and_only_shared_seeds():
    runs = pd.DataFrame(
        [_run("scratch", s, 0.5) for s in range(3)]
        + [_run("probe", s, 0.6) for s in (1, 2, 3)]
        + [_run("probe", s, 0.9, data="digits", size=100) for s in range(3)]
    )
    tables = summarize(runs)
    assert tables.summary["target"].tolist() == [
        "digits / 100 train",
        "similar / 30 train",
        "similar / 30 train",
    ]
    (pair,) = tables.pairs.itertuples()
    assert (pair.target, pair.a, pair.b, pair.n) == ("similar / 30 train", "probe", "scratch", 2)


def test_varying_params_are_never_merged():
    runs = pd.DataFrame(
        [_run("fine_tune", s, 0.8, **{"optim.lr": "0.01"}) for s in range(2)]
        + [_run("fine_tune", s, 0.7, **{"optim.lr": "0.001"}) for s in range(2)]
        + [_run("probe", s, 0.6) for s in range(2)]
    )
    summary = summarize(runs).summary
    assert sorted(summary["strategy"]) == [
        "fine_tune (optim.lr=0.001)",
        "fine_tune (optim.lr=0.01)",
        "probe",
    ]
    assert summary["n"].tolist() == [2, 2, 2]


def test_several_imagenet_backbones_are_never_merged_into_one_source():
    """Lite0/1/2 all have weights=pretrained: the source label alone would average them together
    (and count two of them as reruns); the backbone name must stay in their labels."""

    def probe(name, weights, source, seed, acc):
        extra = {"backbone.name": name, "backbone.weights": weights, "backbone.source": source}
        return _run("probe", seed, acc, **extra)

    runs = pd.DataFrame(
        [probe("lite0", "pretrained", "None", s, 0.6) for s in range(2)]
        + [probe("lite1", "pretrained", "None", s, 0.7) for s in range(2)]
        + [probe("lite0", "source", "animals", s, 0.5) for s in range(2)]
    )
    summary = summarize(runs).summary
    assert sorted(summary["strategy"]) == [
        "probe (from ImageNet, lite0)",
        "probe (from ImageNet, lite1)",
        "probe (from animals, lite0)",
    ]
    assert summary["n"].tolist() == [2, 2, 2]


def test_rerun_of_same_seed_counts_once():
    runs = pd.DataFrame([_run("probe", 0, 0.1), _run("probe", 0, 0.9), _run("probe", 1, 0.8)])
    runs["start_time"] = [1, 2, 3]
    row = _row(summarize(runs).summary, "probe")
    assert (row["n"], row["acc_mean_pct"]) == (2, pytest.approx(85.0))


def test_pareto_front():
    x = [1, 2, 2, 3, 4, 5]
    y = [50, 70, 60, 65, 80, 80]
    assert pareto_front(x, y) == [0, 1, 4]
    assert pareto_front([], []) == []


# --- end to end through MLflow ---------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating the DB is the slow part (~1 s)."""
    mlflow = pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    return uri, client, root


def _log(client, exp_id, tags, params=None, metrics=None, status="FINISHED"):
    from mlflow.entities import Metric, Param, RunTag

    run_id = client.create_run(exp_id, tags=tags).info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, status)
    return run_id


@pytest.mark.slow
def test_write_report_end_to_end(store, tmp_path):
    uri, client, root = store
    exp_id = client.create_experiment("e2e", artifact_location=str(root / "artifacts"))
    parent = _log(client, exp_id, {"transferlab.role": "sweep"})
    _log(client, exp_id, {"transferlab.role": "pretrain"}, {"data.name": "source"}, {"test/acc": 1})
    conditions = {  # strategy, lr -> per-seed test accuracy
        ("scratch", "0.01"): [0.70, 0.60, 0.75],
        ("fine_tune", "0.01"): [0.80, 0.71, 0.84],
        ("fine_tune", "0.001"): [0.72, 0.61, 0.78],
        ("probe", "0.01"): [0.85, 0.48, 0.80],
    }
    for (strategy, lr), accs in conditions.items():
        for seed, acc in enumerate(accs):
            params = {"seed": seed, "study": "e2e", "data.name": "similar", "optim.lr": lr}
            params |= {"finetune.strategy": strategy, "data.samples_per_class": "10"}
            metrics = {"test/acc": acc, "data/train_size": 30, "compute/fit_seconds": 1.5}
            metrics |= {"compute/train_flops": 3e12 if strategy == "fine_tune" else 1e12}
            metrics |= {"compute/train_flops_per_sample": 1e10, "compute/trainable_params": 5e5}
            tags = {"transferlab.role": "job", "mlflow.parentRunId": parent}
            tags |= {"transferlab.condition_hash": f"{strategy}-{lr}"}
            _log(client, exp_id, tags, params, metrics)
    bad = {"seed": 0, "data.name": "similar", "finetune.strategy": "scratch", "optim.lr": "0.01"}
    _log(client, exp_id, {"transferlab.role": "job"}, bad, {"test/acc": 0.0}, status="FAILED")

    report = write_report("e2e", tmp_path / "out", tracking_uri=uri)

    names = {"report.md", "summary.csv", "pairs.csv", "accuracy_vs_compute.png"}
    assert {p.name for p in report.parent.iterdir()} == names
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert len(summary) == 4
    assert summary["n"].tolist() == [3, 3, 3, 3]
    assert _row(summary, "scratch")["acc_mean_pct"] == pytest.approx(68.333, abs=1e-3)
    assert (summary["target"] == "similar / 30 train").all()
    text = report.read_text()
    assert "- 12 finished job runs counted; skipped: 1 job runs not FINISHED" in text
    assert "fine_tune (optim.lr=0.01) > scratch by 10.0 pts" in text
    assert "- similar / 30 train: probe vs scratch:" in text
    assert f"sweep run: {parent}" in text
    logged = {f.path for f in client.list_artifacts(parent, "report")}
    assert logged == {f"report/{n}" for n in names}
    best = {k: v for k, v in client.get_run(parent).data.metrics.items() if k.startswith("best/")}
    assert best == {"best/similar-30/test_acc_pct": pytest.approx(78.333, abs=1e-3)}  # fine_tune lr 0.01
    print(text)


def test_parent_metrics_name_every_target_as_mlflow_allows():
    """The best mean per target, under a name MLflow accepts whatever the data set is called."""
    from mlflow.utils.validation import _validate_metric_name

    runs = [_run("probe", s, 0.5 + s / 10, data="colt's foot/..", size=10) for s in range(3)]
    runs += [_run("fine_tune", s, 0.9, data="digits", size=50) | {"val_acc": 0.8 + s / 100} for s in range(2)]
    metrics = summary_metrics(summarize(pd.DataFrame(runs)).summary)
    assert metrics == {
        "best/colt_s foot_-10/test_acc_pct": pytest.approx(60.0),
        "best/digits-50/test_acc_pct": pytest.approx(90.0),
        "best/digits-50/val_acc_pct": pytest.approx(80.5),
    }
    for name in metrics:
        _validate_metric_name(name)


def test_missing_experiment_is_a_config_error(store, tmp_path):
    uri, client, _ = store
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'"):
        write_report("nope", tmp_path, tracking_uri=uri)
    exp_id = client.create_experiment("only-pretrain")
    _log(client, exp_id, {"transferlab.role": "pretrain"}, {"data.name": "source"})
    with pytest.raises(ConfigError, match="no finished job runs"):
        write_report("only-pretrain", tmp_path, tracking_uri=uri)
