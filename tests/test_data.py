"""Data package: sources, splits, nested subsets, transforms and bad-data errors."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from transferlab.data import InputSpec, build_datamodule, validate_data_config
from transferlab.data import sources as sources_mod
from transferlab.data.splits import subset_train
from transferlab.data.transforms import BatchTransform
from transferlab.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "animals_similar.yaml"
GREY28 = InputSpec(size=28, in_chans=1, mean=(0.0,), std=(1.0,))
RGB16 = InputSpec(size=16, in_chans=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def data_cfg(**overrides):
    cfg = OmegaConf.load(CONF)
    cfg.augment = "none"
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def image_hashes(images: torch.Tensor) -> set[bytes]:
    return {hashlib.sha1(img.numpy().tobytes()).digest() for img in images}


@pytest.fixture(scope="module")
def animals_all():
    return build_datamodule(data_cfg(classes=None), GREY28, seed=0)


# --- animals -------------------------------------------------------------------------------


def test_animals_ten_classes_deduplicated_and_disjoint(animals_all):
    dm = animals_all
    assert dm.class_names == sorted(dm.class_names)
    assert dm.class_names[:3] == ["bear", "bird", "cat"]
    assert dm.num_classes == 10
    sizes = {name: len(dm.splits[name][1]) for name in ("train", "val", "test")}
    assert sum(sizes.values()) == 10_000 - 284
    hashes = {name: image_hashes(dm.splits[name][0]) for name in sizes}
    assert all(len(hashes[n]) == sizes[n] for n in sizes)  # no duplicate inside a split
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_animals_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps animal-mnist"):
        build_datamodule(data_cfg(), GREY28, seed=0)


def test_numpy_only_unpickler_refuses_other_globals():
    payload = pickle.dumps(Path("x"))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        sources_mod._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_class_subset_reindexed_in_given_order(animals_all):
    dm = build_datamodule(data_cfg(classes=["horse", "cat"]), GREY28, seed=0)
    assert dm.class_names == ["horse", "cat"]
    assert dm.num_classes == 2
    images, labels = dm.splits["train"]
    assert set(labels.tolist()) == {0, 1}
    full_images, full_labels = animals_all.splits["train"]
    horse = image_hashes(full_images[full_labels == animals_all.class_names.index("horse")])
    assert image_hashes(images[labels == 0]) == horse
    with pytest.raises(DataError, match="valid names are bear, bird"):
        build_datamodule(data_cfg(classes=["cat", "unicorn"]), GREY28, seed=0)


# --- digits, channels, normalisation -------------------------------------------------------


def test_digits_shape_labels_and_scaling():
    spec = InputSpec(size=8, in_chans=1, mean=(0.0,), std=(1.0,))
    dm = build_datamodule(data_cfg(source="digits", classes=None, batch_size=2000), spec, 0)
    assert dm.class_names == [str(d) for d in range(10)]
    assert sum(len(dm.splits[s][1]) for s in ("train", "val", "test")) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (len(y), 1, 8, 8)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert x.min() == 0.0
    assert x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


def test_greyscale_repeated_to_three_channels_and_normalised():
    spec = InputSpec(size=12, in_chans=3, mean=(0.5, 0.4, 0.3), std=(0.5, 0.2, 0.1))
    dm = build_datamodule(data_cfg(source="digits", classes=None), spec, 0)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 12, 12)
    raw = x * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 0], raw[:, 2])
    # a black pixel (corner of a digit) normalises to -mean/std per channel
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, -2.0, -3.0]))


def test_channel_mismatch_is_a_config_error():
    spec = InputSpec(size=8, in_chans=2, mean=(0.0, 0.0), std=(1.0, 1.0))
    with pytest.raises(ConfigError, match="backbone.in_chans"):
        build_datamodule(data_cfg(source="digits", classes=None), spec, 0)


# --- splits and subsets --------------------------------------------------------------------


def test_fractions_are_nested_and_seeded():
    def train(fraction, seed):
        dm = build_datamodule(data_cfg(fraction=fraction), GREY28, seed)
        return set(dm.train_indices.tolist()), dm.subset_hash

    small, h_small = train(0.1, 0)
    large, h_large = train(0.5, 0)
    other, h_other = train(0.1, 1)
    assert small < large
    assert small != other
    assert h_small != h_other
    assert h_small != h_large
    assert train(0.1, 0) == (small, h_small)


def test_val_and_test_fixed_across_fraction_and_seed():
    ref = build_datamodule(data_cfg(), GREY28, seed=0)
    for fraction, seed in ((0.2, 0), (1.0, 3), (0.05, 7)):
        dm = build_datamodule(data_cfg(fraction=fraction), GREY28, seed)
        for split in ("val", "test"):
            assert torch.equal(dm.splits[split][0], ref.splits[split][0])
            assert torch.equal(dm.splits[split][1], ref.splits[split][1])
    moved = build_datamodule(data_cfg(split_seed=1), GREY28, seed=0)
    assert not torch.equal(moved.splits["val"][0], ref.splits["val"][0])


def test_subsets_are_stratified():
    full = build_datamodule(data_cfg(), GREY28, seed=0).counts["train"]
    tenth = build_datamodule(data_cfg(fraction=0.1), GREY28, seed=0).counts["train"]
    assert tenth == {c: int(np.floor(0.1 * n + 0.5)) for c, n in full.items()}
    fixed = build_datamodule(data_cfg(samples_per_class=5), GREY28, seed=0)
    assert fixed.counts["train"] == {"cat": 5, "dog": 5, "horse": 5}
    assert set(fixed.counts) == {"train", "val", "test"}


def test_samples_per_class_too_large():
    with pytest.raises(DataError, match=r"class 'cat' has only \d+ training images"):
        build_datamodule(data_cfg(samples_per_class=5000), GREY28, seed=0)


def test_fraction_that_empties_a_class():
    labels = np.array([0] * 3 + [1] * 100)
    with pytest.raises(DataError, match="raise the fraction"):
        subset_train(np.arange(103), labels, ["a", "b"], seed=0, fraction=0.1)


def test_train_loader_order_follows_seed():
    def first_labels(seed):
        dm = build_datamodule(data_cfg(batch_size=32), GREY28, seed=seed)
        return next(iter(dm.train_dataloader()))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"source": "mnist"}, "unknown data.source"),
        ({"fraction": 0.0}, "data.fraction"),
        ({"fraction": 1.5}, "data.fraction"),
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"fraction": 0.5, "samples_per_class": 3}, "both set"),
        ({"augment": "heavy"}, "unknown data.augment"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "below 1"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"source": "cifar10", "root": None}, "data.root is required"),
    ],
)
def test_validate_rejects(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_data_config(data_cfg(**overrides))


def test_augment_is_per_sample_and_keeps_shape():
    x = torch.zeros(8, 1, 16, 16, dtype=torch.uint8)
    x[:, :, 4:12, 2:10] = 255
    for preset in ("light", "strong"):
        out = BatchTransform(RGB16, preset).normalise(x)
        assert out.shape == (8, 3, 16, 16)
        assert out.dtype == torch.float32
        assert not all(torch.equal(out[0], out[i]) for i in range(1, 8))
    torch.testing.assert_close(BatchTransform(RGB16).normalise(x), x.float().expand(-1, 3, -1, -1) / 255)


# --- imagefolder ---------------------------------------------------------------------------


def write_images(folder: Path, n: int, color: int, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(color)
    for i in range(n):
        shape = (20, 24, 3) if mode == "RGB" else (20, 24)
        arr = rng.integers(0, 255, size=shape, dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / f"{i}.png")


def folder_cfg(root: Path, **overrides):
    return data_cfg(
        source="imagefolder",
        classes=None,
        root=str(root),
        val_fraction=0.2,
        test_fraction=0.2,
        **overrides,
    )


def test_imagefolder_flat_layout(tmp_path):
    for k, cls in enumerate(["b_cls", "a_cls", "c_cls"]):
        write_images(tmp_path / cls, 10, k)
    dm = build_datamodule(folder_cfg(tmp_path), RGB16, seed=0)
    assert dm.class_names == ["a_cls", "b_cls", "c_cls"]
    assert dm.counts["val"] == dm.counts["test"] == {"a_cls": 2, "b_cls": 2, "c_cls": 2}
    assert dm.counts["train"] == {"a_cls": 6, "b_cls": 6, "c_cls": 6}
    assert dm.splits["train"][0].shape[1:] == (3, 16, 16)
    assert dm.skipped == 0


def test_imagefolder_split_layout_and_greyscale(tmp_path):
    for k, cls in enumerate(["x", "y"]):
        write_images(tmp_path / "train" / cls, 8, k, mode="L")
        write_images(tmp_path / "test" / cls, 3, 10 + k, mode="L")
    dm = build_datamodule(folder_cfg(tmp_path), RGB16, seed=0)
    assert dm.counts["test"] == {"x": 3, "y": 3}  # the given test split, untouched
    assert dm.counts["val"] == {"x": 2, "y": 2}  # carved from train
    assert dm.counts["train"] == {"x": 6, "y": 6}
    assert dm.splits["train"][0].shape[1] == 1  # all greyscale: cached as one channel
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[1] == 3


def _corrupt(root: Path) -> None:
    write_images(root / "a", 4, 0)
    write_images(root / "b", 4, 1)
    (root / "a" / "broken.png").write_bytes(b"not a png")


def _val_extra_class(root: Path) -> None:
    write_images(root / "train" / "a", 4, 0)
    write_images(root / "val" / "a", 2, 1)
    write_images(root / "val" / "zebra", 2, 2)


def _val_missing_class(root: Path) -> None:
    write_images(root / "train" / "a", 4, 0)
    write_images(root / "train" / "b", 4, 1)
    write_images(root / "val" / "a", 2, 2)


def _empty_class(root: Path) -> None:
    write_images(root / "a", 4, 0)
    (root / "b").mkdir()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class folders"),
        (_empty_class, r"class folder .*b is empty"),
        (_corrupt, r"cannot read image .*broken.png.*skip_corrupt=true"),
        (_val_extra_class, r"\['zebra'\] are in val/ but not in train/"),
        (_val_missing_class, r"\['b'\] are in train/ but missing from val/"),
    ],
)
def test_imagefolder_bad_data(tmp_path, make, match):
    root = tmp_path / "imgs"
    make(root)
    with pytest.raises(DataError, match=match) as err:
        build_datamodule(folder_cfg(root), RGB16, seed=0)
    assert "\n" not in str(err.value)


def test_imagefolder_skip_corrupt_counts(tmp_path):
    _corrupt(tmp_path)
    (tmp_path / "b" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        dm = build_datamodule(folder_cfg(tmp_path, skip_corrupt=True), RGB16, seed=0)
    assert dm.skipped == 2
    assert sum(sum(c.values()) for c in dm.counts.values()) == 8


# --- torchvision catalog -------------------------------------------------------------------


def test_fake_cifar10_uses_official_test_split(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def dump(name, obj):
        (folder / name).write_bytes(pickle.dumps(obj))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    def batch(n):
        data = rng.integers(0, 255, size=(n, 3072), dtype=np.uint8)
        return {"data": data, "labels": [i % 10 for i in range(n)]}

    monkeypatch.setattr(CIFAR10, "train_list", [dump(f"data_batch_{i}", batch(10)) for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [dump("test_batch", batch(20))])
    meta = dump("batches.meta", {"label_names": names})
    monkeypatch.setattr(CIFAR10, "meta", {"filename": meta[0], "key": "label_names", "md5": meta[1]})

    cfg = data_cfg(source="cifar10", classes=None, root=str(tmp_path), val_fraction=0.2)
    dm = build_datamodule(cfg, RGB16, seed=0)
    assert dm.class_names == names
    assert dm.counts["test"] == dict.fromkeys(names, 2)
    assert dm.counts["val"] == dict.fromkeys(names, 1)
    assert dm.counts["train"] == dict.fromkeys(names, 4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16)
    assert y.dtype == torch.int64


def test_fake_eurosat_is_carved(tmp_path):
    for k, cls in enumerate(["Forest", "River"]):
        write_images(tmp_path / "eurosat" / "2750" / cls, 10, k)
    cfg = data_cfg(source="eurosat", classes=None, root=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    dm = build_datamodule(cfg, RGB16, seed=0)
    assert dm.class_names == ["Forest", "River"]
    assert dm.counts["test"] == {"Forest": 2, "River": 2}


@pytest.mark.parametrize("source", ["cifar10", "pets", "food101"])
def test_torchvision_offline_without_files(tmp_path, source):
    cfg = data_cfg(source=source, classes=None, root=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=rf"{source} not found under data.root=.*nothing.*download=true"):
        build_datamodule(cfg, RGB16, seed=0)


# --- batches -------------------------------------------------------------------------------


def _module_of(n: int, batch_size: int):
    from transferlab.data import TransferDataModule

    labels = torch.arange(n) % 3
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    splits = {s: (images, labels) for s in ("train", "val", "test")}
    return TransferDataModule(splits, ["a", "b", "c"], InputSpec(4, 1, (0.0,), (1.0,)), seed=0, batch_size=batch_size)


@pytest.mark.parametrize(("n", "batch_size"), [(3 * 43, 64), (8, 7), (65, 64)])
def test_a_last_training_batch_of_one_image_joins_the_batch_before(n, batch_size):
    """animals, 3 classes x 43 images at batch 64 left a batch of 1: BatchNorm raises in train mode."""
    loader = _module_of(n, batch_size).train_dataloader()
    batches = [y for _, y in loader]
    assert len(batches) == len(loader) == n // batch_size
    assert min(len(b) for b in batches) > 1
    seen = (torch.cat([x.flatten(1)[:, 0] for x, _ in loader]) * 255).round().long()
    assert sorted(seen.tolist()) == list(range(n))  # every image once, none dropped


def test_evaluation_batches_are_untouched():
    dm = _module_of(129, 64)
    assert [len(y) for _, y in dm.val_dataloader()] == [64, 64, 1]
    assert [len(y) for _, y in _module_of(130, 64).train_dataloader()] == [64, 64, 2]
