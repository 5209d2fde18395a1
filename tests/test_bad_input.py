"""Bad input, one table: every row fails in seconds with one line naming the problem and the
fix, no traceback, no FINISHED (or dangling RUNNING) run, nothing half-written in the caches,
and a crafted pickle never runs. The README's "Bad input" section lists the same rows."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from transferlab.cache import verify
from transferlab.cli import main

JOB = ["backbone.weights=scratch", "data.samples_per_class=5", "data.augment=none", "trainer.max_epochs=1"]
JOB += ["trainer.min_steps=0", "trainer.accelerator=cpu"]
DIGITS = [*JOB, "data=digits"]
MARKER = "PWNED"
CACHE_KINDS = ("sources", "data", "features", "teachers")  # the cache.py entries a later run reads


class Evil:
    """Unpickling this would create a marker file: weights_only=True must refuse it unrun."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _folder(tmp: Path, extra: str | None = None) -> list[str]:
    _images(tmp / "imgs" / "a", 6)
    _images(tmp / "imgs" / "b", 0 if extra == "empty" else 6)
    if extra == "broken":
        (tmp / "imgs" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    if extra == "text":
        (tmp / "imgs" / "b" / "notes.txt").write_text("not an image")
    return [*JOB, "data=imagefolder", f"data.root={tmp / 'imgs'}"]


def _rgba_folder(tmp: Path, overrides: list[str]) -> list[str]:
    for name in ("a", "b"):
        (tmp / "rgba" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((20, 20, 4), 40 * i, dtype=np.uint8), "RGBA").save(tmp / "rgba" / name / f"{i}.png")
    return [*JOB, "data=imagefolder", f"data.root={tmp / 'rgba'}", "data.channels=4", *overrides]


def _other_arch(tmp: Path) -> list[str]:
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(tmp / "resnet10t.safetensors"))
    return [*DIGITS, f"backbone.weights={tmp / 'resnet10t.safetensors'}"]


def _pickle(tmp: Path) -> list[str]:
    torch.save({"conv1.weight": Evil()}, tmp / "evil.pth")
    return [*DIGITS, f"backbone.weights={tmp / 'evil.pth'}"]


# (name, command, arguments or a function of tmp_path giving them, problem fragment, fix fragment)
TABLE = [
    ("unknown group option", "train", [*DIGITS, "finetune=nope"], "Could not find 'finetune/nope'", "Available"),
    ("unknown field", "train", [*DIGITS, "optim.lrr=0.1"], "optim.lrr is not a config field", "did you mean"),
    ("wrong type", "train", [*DIGITS, "finetune.freeze_depth=abc"], "freeze_depth='abc' is invalid", "use an integer"),
    ("wrong type (int)", "train", [*DIGITS, "trainer.max_epochs=abc"], "trainer.max_epochs", "abc"),
    ("out of range fraction", "train", [*DIGITS, "data.fraction=1.5"], "data.fraction=1.5", "must be in"),
    ("out of range lr", "train", [*DIGITS, "optim.lr=0"], "optim.lr=0", "> 0"),
    ("missing required", "train", [*JOB, "data=imagefolder"], "data.root is required", "set data.root="),
    ("unknown backbone", "train", [*DIGITS, "backbone.name=resnet99"], "not a timm model", "timm.list_models"),
    ("stage the backbone lacks", "train", [*DIGITS, "finetune.truncate_after=stage9"], "'stage9'", "use an index"),
    (
        "truncation after the last stage",
        "train",
        [*DIGITS, "finetune.truncate_after=5"],
        "unknown stage 5",
        "index 0..4",
    ),
    (
        "samples_per_class too high",
        "train",
        [*DIGITS[:-1], "data=digits", "data.samples_per_class=100000"],
        "has only",
        "use at most",
    ),
    ("empty class folder", "train", lambda tmp: _folder(tmp, "empty"), "is empty", "add images"),
    ("unreadable image", "train", lambda tmp: _folder(tmp, "broken"), "bad.png", "skip_corrupt=true"),
    ("non-image file", "train", lambda tmp: _folder(tmp, "text"), "notes.txt", "skip_corrupt=true"),
    (
        "extra-channel stats of the wrong length",
        "train",
        lambda tmp: _rgba_folder(tmp, ["data.extra_mean=[0.4,0.1]"]),
        "data.extra_mean has 2 value(s) but the input has 1 channel(s) beyond RGB",
        "give 1 value(s)",
    ),
    ("extra-channel std of 0", "train", [*DIGITS, "data.extra_std=[0]"], "data.extra_std=[0] is invalid", "> 0"),
    ("missing weights file", "train", [*DIGITS, "backbone.weights=nope.safetensors"], "does not exist", ".safetensors"),
    ("checkpoint of another architecture", "train", _other_arch, "do not fit", "check backbone.name"),
    ("crafted pickle checkpoint", "train", _pickle, "cannot be loaded safely", "use a .safetensors file"),
    ("devices beyond what exists", "train", [*DIGITS, "trainer.devices=4096"], "but this node has", "use at most"),
    ("unreachable store", "train", [*DIGITS, "tracking.uri=http://127.0.0.1:9"], "is unreachable", "sqlite:///"),
    (
        "pretrain a backbone without a source",
        "pretrain",
        ["backbone=efficientnet_lite0"],
        "use no source model",
        "set backbone.weights=source",
    ),
    (
        "unknown run id",
        "reproduce",
        ["0123456789abcdef0123456789abcdef"],
        "is not in the tracking store",
        "check the id",
    ),
]


@pytest.mark.parametrize(("name", "command", "args", "problem", "fix"), TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_fails_in_one_line_leaving_nothing(name, command, args, problem, fix, store, tmp_path, capfd):
    args = args(tmp_path) if callable(args) else args
    try:
        code = main([command, *args])
    except SystemExit as stop:  # a job that failed inside Hydra
        code = stop.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"transferlab {command}: error:")]
    assert len(errors) == 1, err
    assert problem in errors[0]
    assert fix in errors[0]
    assert not Path(MARKER).exists()
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs if r.info.status in ("FINISHED", "RUNNING")] == []
    cache = tmp_path / ".transferlab"
    entries = [p for kind in CACHE_KINDS for p in (cache / kind).glob("*") if p.is_dir()]
    assert [p for p in entries if p.name.startswith(".") or verify(p) is not None] == []  # nothing half-written
