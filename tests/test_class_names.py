"""Class names from real data sets never become MLflow keys: counts are keyed by class index,
the names go to an artifact. Names come from torchvision where it ships them offline, else from
the data sets' published lists (crafted where long), plus the hard cases a folder can have."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.utils.validation import _validate_metric_name
from PIL import Image
from torchvision.datasets import Flowers102
from torchvision.models._meta import _IMAGENET_CATEGORIES

from conftest import FAST
from transferlab.config import compose_config
from transferlab.data import InputSpec, TransferDataModule
from transferlab.data.tvsets import _CATALOG

HARD = ["colt's foot", "a, b", "sweet pea (white)", "naïve café", "日本の花", "a/b", "..", "x=1;y", "Ünïcødé ß", " "]

CLASS_NAMES = {
    "flowers102": list(Flowers102.classes),  # torchvision's own list, with "colt's foot"
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "cifar100": ["apple", "aquarium_fish", "lawn_mower", "maple_tree", "pickup_truck", "sweet_pepper", "willow_tree"],
    "pets": ["Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Great Pyrenees", "Yorkshire Terrier"],
    "dtd": ["banded", "blotchy", "chequered", "polka-dotted", "zigzagged"],
    "eurosat": ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "SeaLake"],
    "food101": ["apple_pie", "baby_back_ribs", "beef_carpaccio", "chicken_curry", "eggs_benedict", "french_fries"],
    "imagenet": list(_IMAGENET_CATEGORIES),  # not catalogued, but the names users meet: "jack-o'-lantern"
    "hard": HARD,
}
SPEC = InputSpec(size=8, in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3)


def test_every_catalogued_data_set_has_a_name_list():
    assert set(_CATALOG) <= set(CLASS_NAMES)
    assert "colt's foot" in CLASS_NAMES["flowers102"]


@pytest.mark.parametrize("source", CLASS_NAMES)
def test_class_count_keys_pass_mlflow_validation_and_names_round_trip(source):
    names = CLASS_NAMES[source]
    labels = torch.arange(len(names)).repeat_interleave(2)
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    splits = {split: (images, labels) for split in ("train", "val", "test")}
    dm = TransferDataModule(splits, names, SPEC, seed=0)

    metrics = dm.count_metrics()
    for key in metrics:
        _validate_metric_name(key)  # raises MlflowException on a bad key
    assert metrics["data/train_size"] == 2 * len(names)
    assert sum(v for k, v in metrics.items() if k.startswith("data/val/")) == 2 * len(names)
    table = json.loads(dm.class_table())
    assert [row["name"] for row in table] == names
    for row in table:
        assert metrics[f"data/test/class{row['index']}"] == row["test"] == 2


@pytest.mark.slow
def test_imagefolder_with_hostile_class_names_trains_and_logs(store, tmp_path):
    folders = ["colt's foot", "a, b", "sweet pea (white)", "naïve 日本"]
    rng = np.random.default_rng(0)
    for name in folders:
        folder = tmp_path / "imgs" / name
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    from transferlab.jobs.run import run

    overrides = [o for o in FAST if not o.startswith(("data=", "data.samples_per_class"))]
    cfg = compose_config(
        [*overrides, "data=imagefolder", f"data.root={tmp_path / 'imgs'}", "study=names", "tracking.log_model=false"]
    )
    run(cfg)
    client = mlflow.MlflowClient(store)
    (job,) = client.search_runs([client.get_experiment_by_name("names").experiment_id])
    assert job.info.status == "FINISHED"
    table = json.loads(Path(client.download_artifacts(job.info.run_id, "classes.json", str(tmp_path))).read_text())
    assert [row["name"] for row in table] == sorted(folders)
    assert sum(row[s] for row in table for s in ("train", "val", "test")) == 24
    assert not [k for k in job.data.metrics if "/class" in k]  # in classes.json, not atop the metrics list
