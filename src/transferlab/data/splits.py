"""Class subsets, fixed val/test carving and nested, stratified, seeded training subsets."""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence

import numpy as np

from transferlab.data.base import TEST, TRAIN, VAL, SourceData
from transferlab.errors import DataError


def select_classes(data: SourceData, classes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """-> (indices of kept samples, new class names); labels are re-indexed 0..k-1 in the
    order given, so `classes: [dog, cat]` makes dog label 0."""
    if classes is None:
        return np.arange(len(data.labels)), list(data.class_names)
    names = [str(c) for c in classes]
    unknown = [c for c in names if c not in data.class_names]
    if unknown:
        raise DataError(f"unknown data.classes {unknown}: valid names are {', '.join(data.class_names)}")
    wanted = [data.class_names.index(c) for c in names]
    keep = np.flatnonzero(np.isin(data.labels, wanted))
    return keep, names


def relabel(labels: np.ndarray, old_names: list[str], new_names: list[str]) -> np.ndarray:
    """Map source label ids onto positions in new_names."""
    lut = np.full(len(old_names), -1, dtype=np.int64)
    for new, name in enumerate(new_names):
        lut[old_names.index(name)] = new
    return lut[labels]


def _class_rng(seed: int, name: str) -> np.random.Generator:
    """RNG per (seed, class name): a class's split and subset do not move when other classes
    are added to or dropped from data.classes."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _carve_count(fraction: float, n: int) -> int:
    return 0 if fraction <= 0 else max(1, math.floor(fraction * n + 0.5))


def assign_splits(
    labels: np.ndarray,
    given: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    class_names: list[str],
) -> np.ndarray:
    """Split id per sample. Splits the source lacks are carved per class from its train part with
    their own RNG (split_seed), so val/test never move when seed or fraction change."""
    split = np.full(len(labels), TRAIN, dtype=np.int8) if given is None else given.copy()
    carve = {s: f for s, f in ((VAL, val_fraction), (TEST, test_fraction)) if not np.any(split == s)}
    if not carve:
        return split
    train_idx = np.flatnonzero(split == TRAIN)
    for c, name in enumerate(class_names):
        idx = train_idx[labels[train_idx] == c]
        perm = idx[_class_rng(split_seed, name).permutation(len(idx))]
        counts = {s: _carve_count(f, len(idx)) for s, f in carve.items()}
        if sum(counts.values()) >= len(idx):
            raise DataError(
                f"class {name!r} has only {len(idx)} training images, too "
                "few to carve val/test: lower data.val_fraction/test_fraction or "
                "add images"
            )
        start = 0
        for s, n in counts.items():
            split[perm[start : start + n]] = s
            start += n
    return split


def subset_train(
    train_idx: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    seed: int,
    fraction: float = 1.0,
    samples_per_class: int | None = None,
) -> np.ndarray:
    """Stratified subset of train_idx, sorted. Nested: each class takes the first n of one seeded
    permutation, so for a given seed a smaller fraction is inside every larger one."""
    chosen = []
    for c, name in enumerate(class_names):
        idx = np.sort(train_idx[labels[train_idx] == c])
        perm = idx[_class_rng(seed, name).permutation(len(idx))]
        if samples_per_class is not None:
            n = int(samples_per_class)
            if n > len(idx):
                raise DataError(
                    f"data.samples_per_class={n} but class {name!r} has only "
                    f"{len(idx)} training images: use at most {len(idx)}"
                )
        else:
            n = math.floor(fraction * len(idx) + 0.5)
            if n < 1:
                raise DataError(
                    f"data.fraction={fraction} leaves class {name!r} ({len(idx)} "
                    "training images) with none: raise the fraction"
                )
        chosen.append(perm[:n])
    return np.sort(np.concatenate(chosen))


def indices_hash(indices: np.ndarray) -> str:
    """Short sha256 of the sorted indices: logged so a run's exact subset can be checked."""
    data = np.sort(np.asarray(indices, dtype=np.int64)).tobytes()
    return hashlib.sha256(data).hexdigest()[:12]
