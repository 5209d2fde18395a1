"""Your own images: root/<class>/* or root/{train,val,test}/<class>/*, listed here, decoded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from transferlab.data.base import TEST, TRAIN, VAL, OpenPath, SourceFiles
from transferlab.data.transforms import InputSpec
from transferlab.errors import DataError

_SPLIT_DIRS = {"train": TRAIN, "val": VAL, "test": TEST}


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Class name -> files; every class folder must hold at least one file."""
    classes = _subdirs(split_dir)
    if not classes:
        raise DataError(f"no class folders in {split_dir}: put images in {split_dir}/<class>/")
    out = {}
    for cls in classes:
        files = sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"class folder {cls} is empty: add images or remove the folder")
        out[cls.name] = files
    return out


def _layout(root: Path) -> dict[int, dict[str, list[Path]]]:
    """Split id -> class -> files, checking that every split has the same classes."""
    names = {p.name for p in _subdirs(root)}
    split_names = names & set(_SPLIT_DIRS)
    if not split_names:
        return {TRAIN: _class_files(root)}
    if "train" not in split_names:
        raise DataError(
            f"{root} has {'/'.join(sorted(split_names))}/ but no train/: add "
            f"{root}/train/<class>/ or use the flat layout {root}/<class>/"
        )
    if names - split_names:
        extra = ", ".join(sorted(names - split_names))
        raise DataError(
            f"{root} mixes split folders with other folders ({extra}): move them into train/<class>/ or remove them"
        )
    layout = {_SPLIT_DIRS[s]: _class_files(root / s) for s in sorted(split_names)}
    train_classes = set(layout[TRAIN])
    for split, by_class in layout.items():
        if split == TRAIN:
            continue
        name = next(k for k, v in _SPLIT_DIRS.items() if v == split)
        if unknown := sorted(set(by_class) - train_classes):
            raise DataError(
                f"classes {unknown} are in {name}/ but not in train/: add training images for them or remove them"
            )
        if missing := sorted(train_classes - set(by_class)):
            raise DataError(
                f"classes {missing} are in train/ but missing from {name}/: give every split the same class folders"
            )
    return layout


def load_imagefolder(cfg: DictConfig, spec: InputSpec) -> SourceFiles:
    """List every image (layout errors fail here); decoding happens once, in the prepared store."""
    if cfg.get("root") is None:
        raise DataError("data.root is not set: point it at a folder of <class>/ image folders")
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist: create it or fix the path")
    layout = _layout(root)
    class_names = sorted(layout[TRAIN])
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, splits = [], [], []
    for split, by_class in layout.items():
        for cls, files in by_class.items():
            paths += files
            labels += [index[cls]] * len(files)
            splits += [split] * len(files)
    return SourceFiles(
        OpenPath(paths),
        np.asarray(labels, dtype=np.int64),
        class_names,
        split=np.asarray(splits, dtype=np.int8) if len(layout) > 1 else None,
        names=[str(p) for p in paths],
    )
