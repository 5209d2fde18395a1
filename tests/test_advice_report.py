"""The report's advice check on synthetic runs: Kendall tau of each measure against the probes'
accuracy per (candidate, stage), and per target whether the advised strategy won."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from transferlab.studies.advice_report import advice_markdown, load_advice, outcomes, probe_accuracy, rank_agreement
from transferlab.studies.report import summarize

TARGET = "digits / 100 train"


def _run(strategy: str, seed: int, acc: float, cut: str = "None", depth: str = "0", weights: str = "source"):
    p = {
        "data.name": "digits",
        "finetune.strategy": strategy,
        "finetune.freeze_depth": depth,
        "finetune.truncate_after": cut,
        "backbone.name": "test_resnet",
        "backbone.weights": weights,
    }
    return {
        "run_id": f"{strategy}-{cut}-{seed}",
        "condition_hash": repr(sorted(p.items())),
        "seed": seed,
        "test_acc": acc,
        "train_size": 100,
        "train_flops": 1e9,
        "train_flops_per_sample": 1e7,
        "fit_seconds": 2.0,
        "trainable_params": 10,
        "start_time": 1000 * seed,
        "end_time": 1000 * seed + 3000,  # 3 s per run
    } | {f"params.{k}": v for k, v in p.items()}


def _sweep(fine_tune: list[float]) -> pd.DataFrame:
    """Probes at stage2 (0.80), stage3 (0.70) and the last stage4 (0.50); fine-tune as given."""
    rows = []
    for seed in range(3):
        rows += [_run("probe", seed, 0.50 + 0.01 * seed, depth="all")]
        rows += [_run("probe_early", seed, 0.70 + 0.01 * seed, cut="stage3", depth="all")]
        rows += [_run("probe_early", seed, 0.80 + 0.01 * seed, cut="stage2", depth="all")]
        rows += [_run("fine_tune", seed, fine_tune[seed])]
    return pd.DataFrame(rows)


def _scores(order: dict[str, list[float]]) -> pd.DataFrame:
    stages = ["stem", "stage1", "stage2", "stage3", "stage4"]
    rows = []
    for measure, values in order.items():
        for i, (stage, value) in enumerate(zip(stages, values)):
            rows.append(
                {"target": TARGET, "candidate": "test_resnet:source", "stage": stage, "order": i}
                | {"measure": measure, "score": value}
            )
    return pd.DataFrame(rows)


def _advice(strategies: str) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "target": TARGET,
                "size": "small",
                "domain": "different",
                "best_stage": "stage2",
                "strategies": strategies,
                "per_class": 10.0,
                "loss_pts": 25.0,
                "knn_gain_pts": -4.0,
                "seconds": 1.5,
            }
        ]
    )


def test_probe_runs_map_to_candidate_and_stage():
    tables = summarize(_sweep([0.9, 0.9, 0.9]))
    acc = probe_accuracy(tables.runs, _scores({"probe": [1, 2, 3, 4, 5]})).set_index("stage")["acc"]
    assert acc.to_dict() == pytest.approx({"stage2": 81.0, "stage3": 71.0, "stage4": 51.0})  # None = last


def test_kendall_tau_known_orders():
    runs = summarize(_sweep([0.9, 0.9, 0.9])).runs
    # stage4 < stage3 < stage2 in accuracy. "probe" agrees, "knn" is reversed, "logme" half right.
    scores = _scores({"probe": [0, 0, 3, 2, 1], "knn": [0, 0, 1, 2, 3], "logme": [0, 0, 3, 1, 2]})
    taus = rank_agreement(scores, probe_accuracy(runs, scores))
    per_target = taus[taus["target"] == TARGET].set_index("measure")
    assert per_target.loc["probe", "tau"] == pytest.approx(1.0)
    assert per_target.loc["knn", "tau"] == pytest.approx(-1.0)
    assert per_target.loc["logme", "tau"] == pytest.approx(1 / 3)  # 2 concordant, 1 discordant of 3 pairs
    pooled = taus[taus["target"].str.startswith("all")].set_index("measure")
    assert pooled.loc["logme", "points"] == 3
    assert pooled.loc["logme", "tau"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("fine_tune", "strategies", "outcome"),
    [
        ([0.95, 0.97, 0.96], "fine_tune", "won"),
        ([0.95, 0.97, 0.96], "probe_early", "lost (significant)"),
        ([0.95, 0.60, 0.90], "probe_early", "within noise of the winner"),  # paired CI spans 0
        ([0.95, 0.96, 0.97], "fine_tune,scratch", "won"),  # either advised option may win
    ],
)
def test_advised_strategy_against_the_winner(fine_tune, strategies, outcome):
    tables = summarize(_sweep(fine_tune))
    (row,) = outcomes(_advice(strategies), tables.runs, tables.summary, tables.pairs).itertuples()
    assert row.outcome == outcome
    assert row.sweep_s == pytest.approx(12 * 3.0)  # 12 runs of 3 s each


def test_section_renders_advice_next_to_outcome():
    tables = summarize(_sweep([0.95, 0.97, 0.96]))
    scores = _scores({"probe": [0, 0, 3, 2, 1]})
    text = "\n".join(advice_markdown(_advice("probe_early"), scores, tables.runs, tables.summary, tables.pairs))
    assert "small + different: probe_early" in text
    assert (
        "10/class; last stage -25.0 pts vs stage2, k-NN -4.0 pts vs random-init | 1.5 | 36 | 4.2% |" in text
    )  # 1.5 s vs 12 runs x 3 s
    assert "| probe | digits / 100 train | 3 | +1.00 |" in text
    assert advice_markdown(pd.DataFrame(), scores, tables.runs, tables.summary, tables.pairs) == []


def test_load_advice_reads_the_latest_advise_run_per_target(store: str) -> None:
    client = mlflow.MlflowClient(store)
    exp = client.create_experiment("study")
    for verdict, score in (("old", 1.0), ("new", 2.0)):
        run = client.create_run(
            exp,
            tags={
                "transferlab.role": "advise",
                "transferlab.advise.target": TARGET,
                "transferlab.advise.size": verdict,
                "transferlab.advise.strategies": "probe_early",
                "transferlab.advise.stages": "stem,stage1,stage2",
            },
        )
        for key, value in {
            "advise/test_resnet:/w/x.pth/stage2/probe": 80.0 * score,
            "advise/test_resnet:/w/x.pth/stem/logme": -0.5,
            "advise/per_class": 10.0,
            "advise/seconds": 1.5,
        }.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    advice, scores = load_advice(client, "study")
    (row,) = advice.itertuples()
    assert row.size == "new"
    assert row.per_class == 10.0
    by_key = scores.set_index(["stage", "measure"])
    assert by_key.loc[("stage2", "probe"), "score"] == 160.0
    assert by_key.loc[("stage2", "probe"), "candidate"] == "test_resnet:/w/x.pth"  # slashes survive
    assert by_key.loc[("stem", "logme"), "order"] == 0
    assert load_advice(client, "no such study")[0].empty


def test_bigger_imagenet_model_first_ranks_imagenet_candidates_by_size_above_all_others():
    from transferlab.studies.advice_report import SIZE_BASELINE, with_size_baseline

    scores = pd.DataFrame(
        [
            {"target": "t", "candidate": c, "stage": "s", "order": 0, "measure": "params", "score": p}
            for c, p in [("lite2:pretrained", 6.1e6), ("lite0:pretrained", 4.7e6), ("lite0:source", 4.7e6)]
        ]
        + [{"target": "t", "candidate": "lite0:source", "stage": "s", "order": 0, "measure": "knn", "score": 90.0}]
    )
    out = with_size_baseline(scores)
    assert "params" not in set(out["measure"])
    baseline = out[out["measure"] == SIZE_BASELINE].set_index("candidate")["score"]
    assert baseline["lite2:pretrained"] > baseline["lite0:pretrained"] > baseline["lite0:source"]
    assert len(out[out["measure"] == "knn"]) == 1
