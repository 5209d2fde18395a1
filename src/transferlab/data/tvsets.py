"""torchvision catalog data sets, with their official splits, decoded once into uint8 arrays."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from transferlab.data.base import TEST, TRAIN, VAL, Loader, SourceData, fit_pil
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


def _decode(ds, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, C, H, W] and labels; array-backed sets (CIFAR) skip PIL entirely."""
    if isinstance(getattr(ds, "data", None), np.ndarray):
        return ds.data.transpose(0, 3, 1, 2).copy(), np.asarray(ds.targets, dtype=np.int64)
    ds.transform = partial(fit_pil, spec=spec)
    pairs = [ds[i] for i in range(len(ds))]
    return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], dtype=np.int64)


def _class_names(ds, n: int) -> list[str]:
    names = getattr(ds, "classes", None)
    return [str(c) for c in names] if names else [str(i) for i in range(n)]


def load_torchvision(name: str, cfg: DictConfig, spec: InputSpec) -> SourceData:
    """Read every official split of a catalog set; a missing split is carved from train later."""
    if cfg.get("root") is None:
        raise DataError(f"data.root is not set: point it at the folder holding {name}'s files")
    _, splits, _ = _CATALOG[name]
    images, labels, split_ids, class_names = [], [], [], None
    for split, kwargs in splits.items():
        ds = _open(name, cfg, kwargs)
        x, y = _decode(ds, spec)
        class_names = class_names or _class_names(ds, int(y.max()) + 1)
        images.append(x)
        labels.append(y)
        split_ids.append(np.full(len(y), split, dtype=np.int8))
    return SourceData(
        np.concatenate(images),
        np.concatenate(labels),
        class_names,
        split=np.concatenate(split_ids) if len(splits) > 1 else None,
    )


TORCHVISION_SOURCES: dict[str, Loader] = {name: partial(load_torchvision, name) for name in _CATALOG}
