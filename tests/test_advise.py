"""`transferlab advise`: targets and candidates from overrides, the four-case verdicts, the verifying
command, and one end-to-end run into a temporary MLflow store."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from transferlab.studies.advise import (
    Settings,
    advise,
    candidate_label,
    decide,
    expand,
    render,
    target_label,
    verify_commands,
)
from transferlab.studies.tables import label_runs


def _rows(candidate: str, probes: list[float], stages=("stem", "stage1", "stage2")) -> list[dict]:
    return [
        {"candidate": candidate, "stage": s, "dims": 8, "probe": p, "knn": p, "logme": p / 100}
        for s, p in zip(stages, probes)
    ]


def test_targets_come_from_data_sweeps_and_candidates_from_backbone_overrides():
    targets, candidates = expand(["experiment=toy"])
    assert len(targets) == 4  # data x data.samples_per_class of the toy grid; finetune and seed ignored
    assert {tuple(t[1:]) for t in targets} == {
        (f"data={d}", f"data.samples_per_class={n}") for d in ("animals_similar", "digits") for n in ("5", "null")
    }
    assert candidates == [[]]  # the configured backbone
    _, candidates = expand(["experiment=default"])  # its grid sweeps the source: two candidates
    assert candidates == [["backbone=efficientnet_lite0"], ["backbone=efficientnet_lite0_silhouettes"]]
    targets, candidates = expand(["data=digits", "backbone.weights=source,scratch", "seed=0,1"])
    assert targets == [["data=digits"]]
    assert candidates == [["backbone.weights=source"], ["backbone.weights=scratch"]]


@pytest.mark.parametrize(
    ("per_class", "probes", "size", "domain", "strategies"),
    [
        (10, [50.0, 70.0, 68.0], "small", "similar", ("probe",)),
        (10, [50.0, 80.0, 60.0], "small", "different", ("probe_early",)),
        (500, [50.0, 70.0, 69.0], "large", "similar", ("fine_tune",)),
        (500, [50.0, 90.0, 60.0], "large", "different", ("fine_tune", "scratch")),
    ],
)
def test_four_cases(per_class, probes, size, domain, strategies):
    advice = decide("t", per_class, _rows("a:source", probes), Settings(small_per_class=50, different_loss_pts=5))
    assert np.isnan(advice.knn_gain_pts)  # no random-init reference: only the stage loss votes
    assert (advice.size, advice.domain, advice.strategies) == (size, domain, strategies)
    assert advice.best_stage == "stage1"
    assert advice.last_stage == "stage2"
    assert advice.loss_pts == pytest.approx(probes[1] - probes[2])


def test_a_source_whose_last_stage_groups_classes_no_better_than_random_features_is_different():
    scores = _rows("a:source", [50.0, 60.0, 62.0])
    reference = [r | {"candidate": "a:scratch", "reference": True} for r in _rows("a:source", [55.0, 70.0, 75.0])]
    advice = decide("t", 500, scores + reference, Settings(similar_knn_gain_pts=-5, different_loss_pts=10))
    assert advice.knn_gain_pts == pytest.approx(62.0 - 75.0)
    assert advice.loss_pts == pytest.approx(0.0)  # the last stage is its best: only the reference tells
    assert advice.domain == "different"
    assert advice.best_candidate == "a:source"  # the reference is a bar, never the advice
    helpful = [r | {"knn": r["knn"] - 20} for r in reference]
    assert decide("t", 500, scores + helpful, Settings(similar_knn_gain_pts=-5)).domain == "similar"
    # k-NN votes, not the probe: random features that probe far better but group classes worse
    strong_probe = [r | {"probe": r["probe"] + 30, "knn": r["knn"] - 20} for r in reference]
    assert decide("t", 500, scores + strong_probe, Settings()).domain == "similar"


def test_recorded_study_scores_give_the_measured_domains():
    """Last-stage scores of the recorded default study's advise runs (docs/default_report.md):
    the probe loss alone judged digits/1259 similar (-5.9 pts, under 7); its k-NN, 3.4 pts below
    random-init features, makes it different, while both similar targets stay similar."""
    recorded = {  # target: (best probe, last probe, last knn, random-init last knn), domain measured
        "digits/1259": ((95.9, 90.0, 83.0, 86.4), "different"),
        "digits/50": ((81.4, 73.2, 44.0, 70.0), "different"),
        "similar/2088": ((92.9, 87.5, 83.0, 77.5), "similar"),
        "similar/15": ((73.1, 68.2, 60.0, 20.0), "similar"),
    }
    for target, ((best, last, knn, random_knn), domain) in recorded.items():
        rows = [
            {"candidate": "m:source", "stage": "stage3", "dims": 8, "probe": best, "knn": 0.0, "logme": 0.0},
            {"candidate": "m:source", "stage": "stage4", "dims": 8, "probe": last, "knn": knn, "logme": 0.0},
            {"candidate": "m:scratch", "stage": "stage4", "dims": 8, "probe": 0.0, "knn": random_knn, "logme": 0.0}
            | {"reference": True},
        ]
        assert decide(target, 100, rows, Settings()).domain == domain, target


def test_best_candidate_is_judged_on_its_own_last_stage():
    scores = _rows("a:source", [10.0, 20.0, 30.0]) + _rows("b:pretrained", [40.0, 95.0, 94.0])
    advice = decide("t", 100, scores, Settings())
    assert (advice.best_candidate, advice.best_stage, advice.last_stage) == ("b:pretrained", "stage1", "stage2")
    assert advice.domain == "similar"  # loses 1 pt, while a:source's last stage is 65 pts below b's best


def test_bad_input_is_one_line(capsys: pytest.CaptureFixture) -> None:
    from transferlab.cli import main

    assert main(["advise", "data=nope"]) == 2
    assert main(["advise", "data=digits", "--small-per-class", "0"]) == 2
    assert main(["advise", "data=digits", "--similar-knn-gain-pts", "nan"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert errors[0].startswith("transferlab advise: error:")
    assert "nope" in errors[0]
    assert "--small-per-class=0" in errors[1]
    assert "--similar-knn-gain-pts=nan must be a number" in errors[2]


def test_verifying_commands():
    advice = decide("t", 10, _rows("a:source", [50.0, 80.0, 60.0]), Settings())
    plain, stage_check = verify_commands(advice, "check", ["data=digits"], [], Settings(seeds=(0, 1)))
    assert plain == "transferlab train -m study=check data=digits finetune=scratch,probe,probe_early,fine_tune seed=0,1"
    # a probe at every stage before the last (stem, stage1) and at the last (null): a tau point each
    assert stage_check.endswith("finetune=probe finetune.truncate_after=stem,stage1,null seed=0,1")
    # A pinned non-scratch weight contradicts finetune=scratch, so scratch is left out.
    (pinned, _) = verify_commands(advice, "check", ["data=digits"], ["backbone.weights=pretrained"], Settings())
    assert "finetune=probe,probe_early,fine_tune " in pinned
    last_best = decide("t", 10, _rows("a:source", [50.0, 60.0, 80.0]), Settings())
    assert "finetune.truncate_after=stem,stage1,null" in verify_commands(last_best, "check", [], [], Settings())[1]
    one_stage = decide("t", 10, _rows("a:source", [80.0], stages=("stem",)), Settings())
    assert len(verify_commands(one_stage, "check", [], [], Settings())) == 1  # nothing earlier to cut at
    reference = [r | {"candidate": "a:scratch", "reference": True} for r in _rows("a:source", [1.0, 2.0, 3.0])]
    other = _rows("b:source", [10.0, 20.0], stages=("x1", "x2"))
    mixed = decide("t", 10, _rows("a:source", [50.0, 80.0, 60.0]) + reference + other, Settings())
    assert mixed.best_candidate == "a:source"
    assert verify_commands(mixed, "check", [], [], Settings())[1].count("truncate_after=stem,stage1,null ") == 1


def test_a_listed_random_init_candidate_is_the_reference_and_a_candidate() -> None:
    """`backbone.weights=<file>,scratch`: the scratch candidate's k-NN is the bar (no NaN verdict)
    and it may still win the ranking."""
    source = [r | {"listed": True} for r in _rows("a:file", [60.0, 70.0, 65.0])]
    scratch = [r | {"reference": True, "listed": True} for r in _rows("a:scratch", [50.0, 55.0, 58.0])]
    advice = decide("t", 10, source + scratch, Settings())
    assert advice.knn_gain_pts == pytest.approx(65.0 - 58.0)  # last stage k-NN: source minus random init
    assert "+7.0 pts above that of random-init features" in render(advice, Settings())
    better = [r | {"probe": r["probe"] + 30} for r in scratch]
    assert decide("t", 10, source + better, Settings()).best_candidate == "a:scratch"


def test_a_verdict_without_a_reference_stage_says_why_not_nan() -> None:
    other = [r | {"reference": True} for r in _rows("b:scratch", [10.0, 20.0], stages=("x1", "x2"))]
    advice = decide("t", 10, _rows("a:source", [50.0, 80.0, 60.0]) + other, Settings())
    text = render(advice, Settings())
    assert np.isnan(advice.knn_gain_pts)
    assert "nan" not in text.lower()
    assert "was not compared with random-init features" in text


@pytest.mark.slow
def test_advise_end_to_end_logs_every_score(store: str, capsys: pytest.CaptureFixture) -> None:
    overrides = ["study=adv", "data=digits", "data.samples_per_class=5", "backbone.weights=scratch"]
    (advice,) = advise(overrides)
    printed = capsys.readouterr().out
    assert "transferlab train -m study=adv data=digits data.samples_per_class=5" in printed
    assert advice.target == "digits / 50 train"
    assert advice.per_class == 5
    assert advice.size == "small"
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("adv").experiment_id])
    assert "(random-init reference)" not in printed  # the candidate is random init itself
    assert run.data.tags["transferlab.role"] == "advise"
    assert run.data.tags["transferlab.advise.strategies"] == ",".join(advice.strategies)
    stages = run.data.tags["transferlab.advise.stages"].split(",")
    assert stages == ["stem", "stage1", "stage2", "stage3", "stage4"]  # test_resnet: every stage scored
    for stage in stages:
        for measure in ("logme", "knn", "probe"):
            assert f"advise/test_resnet:scratch/{stage}/{measure}" in run.data.metrics
    assert 0 <= run.data.metrics["advise/test_resnet:scratch/stage4/probe"] <= 100
    assert run.data.metrics["data/train_size"] == 50
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"advice.md", "scores.csv"}


def test_candidate_labels_are_valid_mlflow_metric_names():
    from mlflow.utils.validation import _validate_metric_name

    for weights in ("source", "runs:/abc123/model/backbone.safetensors", "/data/w@v2+final (copy).pth"):
        label = candidate_label("resnet18.a1_in1k", weights)
        _validate_metric_name(f"advise/{label}/stage4/probe")  # raises on a bad name
    assert candidate_label("resnet18", "~/w@1.pth") == "resnet18:_/w_1.pth"


def test_target_label_matches_the_reports_label_for_the_same_runs():
    for name, root in (("digits", None), ("imagefolder", "/data/leaves/")):
        row = {"run_id": "r", "condition_hash": "c", "seed": 0, "train_size": 30.0, "start_time": 0}
        row |= {"params.data.name": name, "params.data.root": str(root), "params.finetune.strategy": "probe"}
        (reported,) = label_runs(pd.DataFrame([row]))["target"]
        assert target_label(OmegaConf.create({"name": name, "root": root}), 30) == reported
