"""torchvision catalog data sets, with their official splits, decoded once into the prepared store."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from transferlab.data.base import TEST, TRAIN, VAL, Loader, SourceData, SourceFiles
from transferlab.data.transforms import InputSpec
from transferlab.errors import DataError

# name -> (torchvision class name, {split id: constructor kwargs}, files expected under root)
_CATALOG: dict[str, tuple[str, dict[int, dict], str]] = {
    "cifar10": (
        "CIFAR10",
        {TRAIN: {"train": True}, TEST: {"train": False}},
        "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
    ),
    "cifar100": (
        "CIFAR100",
        {TRAIN: {"train": True}, TEST: {"train": False}},
        "cifar-100-python/ (train, test, meta)",
    ),
    "flowers102": (
        "Flowers102",
        {s: {"split": n} for s, n in ((TRAIN, "train"), (VAL, "val"), (TEST, "test"))},
        "flowers-102/ (jpg/, imagelabels.mat, setid.mat)",
    ),
    "pets": (
        "OxfordIIITPet",
        {TRAIN: {"split": "trainval"}, TEST: {"split": "test"}},
        "oxford-iiit-pet/ (images/, annotations/)",
    ),
    "dtd": (
        "DTD",
        {s: {"split": n} for s, n in ((TRAIN, "train"), (VAL, "val"), (TEST, "test"))},
        "dtd/dtd/ (images/, labels/)",
    ),
    "eurosat": ("EuroSAT", {TRAIN: {}}, "eurosat/2750/<class>/*.jpg"),
    "food101": (
        "Food101",
        {TRAIN: {"split": "train"}, TEST: {"split": "test"}},
        "food-101/ (images/, meta/)",
    ),
}


def _open(name: str, cfg: DictConfig, kwargs: dict):
    """Construct the torchvision data set; turn its missing-files errors into a DataError."""
    import torchvision.datasets as tvd

    cls_name, _, files = _CATALOG[name]
    root = Path(str(cfg.root)).expanduser()
    download = bool(cfg.get("download", False))
    try:
        return getattr(tvd, cls_name)(root=str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError) as err:
        hint = "check your connection" if download else "or set data.download=true when online"
        raise DataError(f"{name} not found under data.root={root}: put {files} there, {hint} ({err})") from err
    except OSError as err:  # URLError and friends when downloading offline
        raise DataError(
            f"{name} download to {root} failed ({err}): put {files} there by hand and set data.download=false"
        ) from err


class _OpenItem:
    """Picklable `open(i)`: item i of a torchvision file-backed data set as a PIL image."""

    def __init__(self, ds) -> None:
        ds.transform = ds.target_transform = None
        self.ds = ds

    def __call__(self, i: int):
        return self.ds[i][0]


def _labels(ds) -> np.ndarray:
    """Labels without decoding any image (torchvision keeps them in `targets` or `_labels`)."""
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = getattr(ds, "_labels", None)
    if labels is None:
        labels = [ds[i][1] for i in range(len(ds))]
    return np.asarray(labels, dtype=np.int64)


def _class_names(ds, n: int) -> list[str]:
    names = getattr(ds, "classes", None)
    return [str(c) for c in names] if names else [str(i) for i in range(n)]


def load_torchvision(name: str, cfg: DictConfig, spec: InputSpec) -> SourceData | SourceFiles:
    """Every official split of a catalog set; a missing split is carved from train later.
    Array-backed sets (CIFAR) come back decoded; file-backed ones as files to decode once."""
    if cfg.get("root") is None:
        raise DataError(f"data.root is not set: point it at the folder holding {name}'s files")
    _, splits, _ = _CATALOG[name]
    sets = {split: _open(name, cfg, kwargs) for split, kwargs in splits.items()}
    class_names = _class_names(next(iter(sets.values())), 0)
    labels = [_labels(ds) for ds in sets.values()]
    split_ids = np.concatenate([np.full(len(y), s, dtype=np.int8) for s, y in zip(sets, labels, strict=True)])
    split = split_ids if len(splits) > 1 else None
    if len(class_names) == 0:
        class_names = [str(i) for i in range(int(max(y.max() for y in labels)) + 1)]
    if all(isinstance(getattr(ds, "data", None), np.ndarray) for ds in sets.values()):
        images = np.concatenate([ds.data.transpose(0, 3, 1, 2) for ds in sets.values()])
        return SourceData(images, np.concatenate(labels), class_names, split=split)
    openers = [_OpenItem(ds) for ds in sets.values()]
    offsets = np.cumsum([0] + [len(y) for y in labels])
    return SourceFiles(_OpenConcat(openers, offsets), np.concatenate(labels), class_names, split=split)


class _OpenConcat:
    """Picklable `open(i)` over several splits laid end to end."""

    def __init__(self, openers: list[_OpenItem], offsets: np.ndarray) -> None:
        self.openers, self.offsets = openers, offsets

    def __call__(self, i: int):
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.openers[part](i - int(self.offsets[part]))


TORCHVISION_SOURCES: dict[str, Loader] = {name: partial(load_torchvision, name) for name in _CATALOG}
