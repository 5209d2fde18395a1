"""Feature cache: cached and uncached runs agree, keys never serve stale features, one pass
gives every stage's features on every timm family."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST
from test_stages import FAMILIES, backbone
from transferlab.config import compose_config
from transferlab.data import InputSpec, build_datamodule
from transferlab.data.transforms import BatchTransform
from transferlab.jobs.run import run
from transferlab.transfer import features as feat
from transferlab.transfer.module import TransferModule

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")

SPEC = InputSpec(size=32, in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
DIGITS = OmegaConf.create({"source": "digits", "classes": None, "samples_per_class": 2, "batch_size": 8})


@pytest.fixture(scope="module")
def digits():
    return build_datamodule(DIGITS, SPEC, seed=0)


def _job(store: str, *overrides: str) -> tuple[dict[str, float], mlflow.entities.Run]:
    metrics = run(compose_config([*FAST, "trainer.max_epochs=2", "study=features", *overrides]))
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("features")
    latest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    return metrics, latest


# --- correctness: cached == uncached ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("finetune", "extra"),
    [("probe", []), ("probe_early", []), ("head_then_all", ["trainer.max_epochs=3", "finetune.head_epochs=2"])],
)
def test_cached_run_matches_uncached(store, finetune, extra):
    plain, plain_run = _job(store, f"finetune={finetune}", "finetune.cache_features=off", *extra)
    cached, cached_run = _job(store, f"finetune={finetune}", *extra)
    assert plain_run.data.tags["transferlab.feature_cache"] == "unused: finetune.cache_features=off"
    assert cached_run.data.tags["transferlab.feature_cache"] == "built"
    assert cached_run.data.tags["transferlab.cache_features"] == (
        "auto" if finetune == "head_then_all" else "unaugmented"
    )
    logged, plain_logged = cached_run.data.metrics, plain_run.data.metrics
    for key in ("test/loss", "test/f1", "val/loss", "train/loss", "train/acc"):
        assert logged[key] == pytest.approx(plain_logged[key], rel=1e-5, abs=1e-6), key
    assert cached["test/acc"] == plain["test/acc"]
    assert cached["compute/cache_build_flops"] > 0 == plain["compute/cache_build_flops"]
    if finetune == "head_then_all":  # only the head phase is cached; fine-tuning pays in full
        assert 0.5 * plain["compute/train_flops"] < cached["compute/train_flops"] < plain["compute/train_flops"]
    else:  # a probe on cached features pays for its head only
        assert cached["compute/train_flops"] * 100 < plain["compute/train_flops"]


@pytest.mark.slow
def test_other_jobs_reuse_the_features_and_pay_no_build(store):
    first, _ = _job(store, "finetune=probe")
    entries = sorted(p.name for p in (Path(".transferlab") / "features").iterdir() if p.is_dir())
    other, other_run = _job(store, "finetune=probe", "optim.lr=0.01", "finetune.head.hidden=[16]")
    assert other_run.data.tags["transferlab.feature_cache"] == "reused"
    assert other["compute/cache_build_flops"] == 0 < first["compute/cache_build_flops"]
    assert sorted(p.name for p in (Path(".transferlab") / "features").iterdir() if p.is_dir()) == entries


@pytest.mark.slow
def test_augmented_data_is_not_cached_and_says_why(store, capsys):
    _, job = _job(store, "finetune=probe", "data.augment=light", "finetune.cache_features=auto")
    assert job.data.tags["transferlab.feature_cache"].startswith("unused: data.augment=light randomises")
    assert capsys.readouterr().out.count("feature cache: not used") == 1


@pytest.mark.slow
def test_unaugmented_mode_probes_as_if_augmentation_were_off(store, capsys):
    """The probe presets' mode: with data.augment on, the head trains on cached features of
    unaugmented images, i.e. exactly the uncached run with augmentation off."""
    _, plain = _job(store, "finetune=probe", "data.augment=none", "finetune.cache_features=off")
    _, cached = _job(store, "finetune=probe", "data.augment=light")
    _, augmented = _job(store, "finetune=probe", "data.augment=light", "finetune.cache_features=off")
    assert cached.data.tags["transferlab.feature_cache"] == "built"
    assert "cached frozen features of unaugmented images (data.augment=light skipped)" in capsys.readouterr().out
    for key in ("test/loss", "val/loss", "train/loss"):
        assert cached.data.metrics[key] == pytest.approx(plain.data.metrics[key], rel=1e-5, abs=1e-6), key
    # the control: augmentation does change what an uncached probe trains on
    assert augmented.data.metrics["train/loss"] != pytest.approx(plain.data.metrics["train/loss"], rel=1e-5)


def test_reasons_for_not_caching():
    assert feat.why_not_cached("auto", frozenset(), "none") is None
    assert feat.why_not_cached("off", frozenset(), "none") == "finetune.cache_features=off"
    assert "partial freeze" in feat.why_not_cached("auto", frozenset({3, 4}), "none")
    assert "data.augment=strong" in feat.why_not_cached("auto", frozenset(), "strong")
    assert feat.why_not_cached("unaugmented", frozenset(), "strong") is None
    assert "partial freeze" in feat.why_not_cached("unaugmented", frozenset({3, 4}), "strong")


def test_unknown_cache_mode_is_a_config_error():
    from transferlab.config import validate
    from transferlab.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune.cache_features"):
        validate(compose_config(["backbone.weights=scratch", "finetune.cache_features=sometimes"]))


# --- keys: never stale --------------------------------------------------------------------------
def _cfg(**data):
    return compose_config(["backbone.weights=scratch", "data=digits", *(f"data.{k}={v}" for k, v in data.items())])


def _keys(cfg, model, data, precision="32-true", cut=None):
    identity = feat.feature_identity(cfg, model, cut, data.spec)
    return {s: feat.split_key(identity, precision, data, s) for s in ("train", "val", "test")}


def test_key_follows_weights_subset_code_precision_and_cut(cfg, digits, monkeypatch):
    model, _ = backbone("test_resnet")
    base = _keys(_cfg(), model, digits)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3  # a retrained or swapped weight file
    assert _keys(_cfg(), changed, digits)["train"] != base["train"]
    other_subset = build_datamodule(DIGITS, SPEC, seed=1)
    assert other_subset.subset_hash != digits.subset_hash
    moved = _keys(_cfg(), model, other_subset)
    assert moved["train"] != base["train"]
    assert (moved["val"], moved["test"]) == (base["val"], base["test"])  # shared by every seed
    assert _keys(_cfg(), model, digits, "bf16-mixed")["train"] != base["train"]
    assert _keys(_cfg(), model, digits, cut=3)["train"] != base["train"]
    assert _keys(_cfg(split_seed=1), model, digits)["val"] != base["val"]
    # Fields that do not change the images the backbone sees do not split the cache.
    assert _keys(_cfg(batch_size=7, augment="none", num_workers=1), model, digits) == base
    monkeypatch.setattr(feat, "code_version", lambda: "edited")
    assert _keys(_cfg(), model, digits)["train"] != base["train"]


def test_changed_weights_rebuild_instead_of_serving_stale_rows(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(feat, "IN_MEMORY_BYTES", 0)  # exercise the memory-mapped path too
    model, _ = backbone("test_resnet")
    model.eval()

    def read(m):
        identity = feat.feature_identity(_cfg(), m, None, digits.spec)
        return feat.cached_features(
            tmp_path,
            feat.split_key(identity, "32-true", digits, "train"),
            lambda x: {"pooled": m(x)},
            lambda: iter(digits.ordered_dataloader("train")),
            device=torch.device("cpu"),
            flops_per_sample=1.0,
        )

    first = read(model)
    again = read(model)
    assert first.built
    assert not again.built
    assert again.build_flops == 0 < first.build_flops
    assert again.mapped
    assert torch.equal(again.features["pooled"], first.features["pooled"])
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.5)
    fresh = read(changed)
    assert fresh.built
    x, _ = BatchTransform(digits.spec)(digits.splits["train"])
    with torch.no_grad():
        expected = changed(x)
    torch.testing.assert_close(fresh.features["pooled"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fresh.features["pooled"], first.features["pooled"])
    assert torch.equal(fresh.labels, digits.splits["train"][1])


def test_ordered_loader_covers_a_split_in_order_unaugmented():
    dm = build_datamodule(OmegaConf.merge(DIGITS, {"augment": "strong"}), SPEC, seed=0)
    xs, ys = zip(*dm.ordered_dataloader("train"), strict=True)
    expected_x, expected_y = BatchTransform(SPEC)(dm.splits["train"])
    torch.testing.assert_close(torch.cat(xs), expected_x)
    assert torch.equal(torch.cat(ys), expected_y)


# --- every stage in one pass (for `transferlab advise`) -----------------------------------------
@pytest.fixture(scope="module")
def two_digits():
    return build_datamodule(OmegaConf.merge(DIGITS, {"classes": ["0", "1"], "val_fraction": 0.1}), SPEC, seed=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_stage_features_match_truncated_backbones(name, tmp_path, cfg, two_digits):
    digits = two_digits
    model, stages = backbone(name)
    run_cfg = copy.deepcopy(cfg)
    OmegaConf.update(run_cfg, "cache_dir", str(tmp_path))
    out = feat.extract_stage_features(run_cfg, model, stages, digits, splits=("val",))["val"]
    assert out.built
    assert set(out.features) == {stages.names[s] for s in stages.feature_index}
    x, _ = next(iter(digits.ordered_dataloader("val")))
    for stage in stages.feature_index:
        ft = copy.deepcopy(cfg.finetune)
        OmegaConf.update(ft, "truncate_after", stages.names[stage])
        module = TransferModule(copy.deepcopy(model), stages, 10, (3, 32, 32), ft, cfg.optim).eval()
        with torch.no_grad():
            expected = module.features(x)
        got = out.features[stages.names[stage]][: len(x)]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"{name} {stages.names[stage]}")
    again = feat.extract_stage_features(run_cfg, model, stages, digits, splits=("val",))["val"]
    assert not again.built


def test_head_costs_keep_only_the_head():
    costs = [
        SimpleNamespace(name="backbone.conv1", flops=100.0, has_params=True),
        SimpleNamespace(name="head.0", flops=2.0, has_params=True),
    ]
    assert [c.name for c in feat.head_costs(costs)] == ["head.0"]
    assert feat.backbone_flops(costs) == 100.0


def test_report_counts_the_build_once_beside_head_only_training_flops():
    import pandas as pd

    from test_report import _run
    from transferlab.studies.report import render_markdown, summarize

    runs = [_run("probe", seed, 0.8, flops=1e6) | {"cache_build_flops": 5e9 if seed == 0 else 0.0} for seed in range(3)]
    runs += [_run("fine_tune", seed, 0.9) for seed in range(3)]
    tables = summarize(pd.DataFrame(runs))
    probe = tables.summary.set_index("strategy").loc["probe"]
    assert probe["train_flops"] == 1e6
    assert probe["cache_build_flops"] == 5e9  # paid once, by seed 0
    assert tables.summary.set_index("strategy").loc["fine_tune"]["cache_build_flops"] == 0
    text = render_markdown("x", tables, None)
    assert "cache build FLOPs (once)" in text
    assert "| 5 G |" in text
