"""Errors about the target arrive before anything slow: with no source model cached (a fresh
cache_dir) and the default `backbone.weights=source`, a bad data root, class list, split size,
weights file, teacher or cache folder fails in one line, and no source model or teacher was
trained (no `training source model` line, no `sources/` or `teachers/` entry in the cache)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from transferlab.cli import main

QUICK = ["data.augment=none", "trainer.max_epochs=1", "trainer.min_steps=0", "trainer.accelerator=cpu"]


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((20, 20, 3), 40 * i % 255, dtype=np.uint8)).save(folder / f"{i}.png")


def _empty_root(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["data=imagefolder", f"data.root={tmp / 'empty'}"]


def _tiny_class(tmp: Path) -> list[str]:
    _images(tmp / "imgs" / "a", 8)
    _images(tmp / "imgs" / "b", 2)  # too few to carve val and test from
    return ["data=imagefolder", f"data.root={tmp / 'imgs'}"]


def _broken_file(tmp: Path) -> list[str]:
    _images(tmp / "imgs" / "a", 8)
    _images(tmp / "imgs" / "b", 8)
    (tmp / "imgs" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return ["data=imagefolder", f"data.root={tmp / 'imgs'}"]


def _student_of_another_arch(tmp: Path) -> list[str]:
    # distill's teacher is `trained`, and it starts from the source model: both would train first
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(tmp / "resnet10t.safetensors"))
    return ["finetune=distill", f"backbone.weights={tmp / 'resnet10t.safetensors'}"]


def _teacher_of_other_classes(tmp: Path) -> list[str]:
    save_file(timm.create_model("test_resnet", num_classes=7).state_dict(), str(tmp / "teacher.safetensors"))
    return [
        "finetune=distill",
        f"finetune.teacher.weights={tmp / 'teacher.safetensors'}",
        "finetune.teacher.name=test_resnet",
    ]


def _unwritable_cache(tmp: Path) -> list[str]:
    (tmp / "blocker").write_text("a file where the cache folder should go")
    return [f"cache_dir={tmp / 'blocker' / 'cache'}"]


# (name, command, arguments of tmp_path, fragment of the one error line)
TABLE = [
    ("empty data root", "train", _empty_root, "no class folders in"),
    ("unknown class", "train", lambda tmp: ["data.classes=[cat,unicorn]"], "unknown data.classes ['unicorn']"),
    ("samples_per_class too high", "train", lambda tmp: ["data.samples_per_class=100000"], "has only"),
    ("class too small to split", "train", _tiny_class, "too few to carve val/test"),
    ("unreadable file", "train", _broken_file, "bad.png"),
    ("student weights of another architecture", "train", _student_of_another_arch, "do not fit"),
    ("teacher of another class count", "train", _teacher_of_other_classes, "the teacher predicts 7 classes"),
    ("unwritable cache folder", "train", _unwritable_cache, "cache_dir"),
    ("extra-channel stats on RGB data", "train", lambda tmp: ["data.extra_mean=[0.4]"], "0 channel(s) beyond RGB"),
    ("bad value in a sweep", "train", lambda tmp: ["-m", "data.samples_per_class=5,100000"], "has only"),
    ("advise on an unknown class", "advise", lambda tmp: ["data.classes=[cat,unicorn]"], "unicorn"),
]


@pytest.mark.parametrize(("name", "command", "args", "problem"), TABLE, ids=[row[0] for row in TABLE])
def test_target_errors_come_before_any_source_model_or_teacher(name, command, args, problem, store, tmp_path, capfd):
    try:
        code = main([command, *args(tmp_path), *QUICK])
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    assert code == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith(f"transferlab {command}: error:")]
    assert len(errors) == 1, err
    assert problem in errors[0]
    assert "training source model" not in out + err
    assert "training the distillation teacher" not in out + err
    for kind in ("sources", "teachers"):
        assert not list((tmp_path / ".transferlab" / kind).glob("*")), f"{kind} entry made before the error"
    client = mlflow.MlflowClient(store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # no run at all


def test_target_check_is_what_the_job_sees(store, tmp_path) -> None:
    """The check's split sizes are the job's: it reads the same store and the same subset rules."""
    from transferlab.config import compose_config
    from transferlab.data import build_datamodule
    from transferlab.jobs.target import check_target
    from transferlab.transfer.backbone import build_model, input_spec

    cfg = compose_config(["data=digits", "data.samples_per_class=7", "backbone.weights=scratch"])
    sizes = check_target(cfg)
    spec = input_spec(build_model(cfg.backbone, pretrained=False), cfg.backbone)
    data = build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=cfg.cache_dir)
    assert sizes == {split: int(data.count_metrics()[f"data/{split}_size"]) for split in ("train", "val", "test")}
    assert sizes["train"] == 70


def test_no_data_check_leaves_the_check_to_each_job(store, tmp_path, monkeypatch, capfd) -> None:
    """On a cluster the data may exist only on the nodes: `--no-data-check` skips the check on the
    submitting machine, and the job still refuses the bad root with the same one-line error."""
    import transferlab.cli

    def checked_here(combos):
        raise AssertionError("the pre-sweep data check ran despite --no-data-check")

    monkeypatch.setattr(transferlab.cli, "_check_targets", checked_here)
    try:
        code = main(["train", "--no-data-check", *_empty_root(tmp_path), *QUICK])
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    assert "--no-data-check" in out
    assert code != 0
    assert "no class folders in" in out + err  # the job's own check
    assert "training source model" not in out + err
