"""Config validation and the Lightning data module: decode once, split, subset, batch."""

from __future__ import annotations

import json

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from transferlab.data.base import SPLIT_NAMES, TEST, TRAIN, VAL
from transferlab.data.sources import SOURCES
from transferlab.data.splits import (
    assign_splits,
    indices_hash,
    relabel,
    select_classes,
    subset_train,
)
from transferlab.data.transforms import (
    AUGMENT_PRESETS,
    BatchTransform,
    InputSpec,
    check_channels,
    resize_cached,
)
from transferlab.errors import ConfigError

_NEEDS_ROOT = set(SOURCES) - {"animals", "digits"}


def _data_group(cfg: DictConfig) -> DictConfig:
    """Accept the `data` group itself or a root config holding it."""
    return cfg.data if "source" not in cfg and "data" in cfg else cfg


def validate_data_config(cfg: DictConfig) -> None:
    """Cheap checks, before anything is loaded, so a sweep fails on its first bad value."""
    cfg = _data_group(cfg)
    source = cfg.get("source")
    if source not in SOURCES:
        raise ConfigError(f"unknown data.source={source!r}: use one of {', '.join(SOURCES)}")
    fraction = cfg.get("fraction", 1.0)
    fraction = 1.0 if fraction is None else fraction
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"data.fraction={fraction!r} must be in (0, 1]: e.g. data.fraction=0.1")
    spc = cfg.get("samples_per_class")
    if spc is not None:
        if isinstance(spc, bool) or not isinstance(spc, int) or spc < 1:
            raise ConfigError(f"data.samples_per_class={spc!r} must be an integer >= 1 or null")
        if fraction < 1:
            raise ConfigError(
                "data.fraction and data.samples_per_class are both set: set "
                "data.fraction=1.0 or data.samples_per_class=null"
            )
    val_f, test_f = cfg.get("val_fraction", 0.15), cfg.get("test_fraction", 0.15)
    for key, value in (("val_fraction", val_f), ("test_fraction", test_f)):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"data.{key}={value!r} must be in [0, 1): e.g. data.{key}=0.15")
    if val_f + test_f >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_f + test_f:g} leaves "
            "no training data: keep their sum below 1"
        )
    augment = cfg.get("augment", "none")
    if augment not in AUGMENT_PRESETS:
        raise ConfigError(f"unknown data.augment={augment!r}: use one of {', '.join(AUGMENT_PRESETS)}")
    classes = cfg.get("classes")
    if classes is not None:
        if isinstance(classes, str) or len(classes) == 0:
            raise ConfigError(f"data.classes={classes!r} must be a list of names or null")
        if len(set(map(str, classes))) != len(classes):
            raise ConfigError(f"data.classes={list(classes)} repeats a name: list each once")
    if int(cfg.get("batch_size", 1)) < 1 or int(cfg.get("num_workers", 0)) < 0:
        raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")
    if source in _NEEDS_ROOT and cfg.get("root") is None:
        raise ConfigError(f"data.root is required for data.source={source}: set data.root=PATH")


class _IndexBatches(Dataset):
    """Indexed by a list of indices: one tensor gather per batch instead of one per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


class _EpochBatches(BatchSampler):
    """Forwards Lightning's per-epoch `set_epoch` to a DistributedSampler inside, so shards reshuffle.

    `fold_single`: a last batch of one image joins the batch before it, because BatchNorm cannot
    train on one value per channel ("Expected more than 1 value per channel"); no image is dropped.
    """

    def __init__(self, sampler, batch_size: int, fold_single: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.fold_single = fold_single

    def _folds(self) -> bool:
        return self.fold_single and len(self.sampler) % self.batch_size == 1 and len(self.sampler) > 1

    def __iter__(self):
        batches = super().__iter__()
        if not self._folds():
            yield from batches
            return
        previous = next(batches)
        for batch in batches:
            if len(batch) == 1:
                batch = previous + batch
            else:
                yield previous
            previous = batch
        yield previous

    def __len__(self) -> int:
        return super().__len__() - self._folds()

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class TransferDataModule(pl.LightningDataModule):
    """Holds uint8 images for train/val/test in memory; batches are normalised float32."""

    def __init__(
        self,
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
        class_names: list[str],
        spec: InputSpec,
        seed: int,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: str = "none",
        subset_hash: str = "",
        skipped: int = 0,
        train_indices: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.spec = spec
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.subset_hash = subset_hash
        self.skipped = skipped
        self.train_indices = train_indices  # source indices of the train subset (hashed above)
        self.counts = {
            name: {c: int((y == i).sum()) for i, c in enumerate(self.class_names)} for name, (_, y) in splits.items()
        }

    def count_metrics(self) -> dict[str, float]:
        """Images per split and per class. Classes are keyed by index, never by name: MLflow keys
        allow only `[A-Za-z0-9_-. /:]`, and class names hold anything (Flowers102's `colt's foot`,
        a folder called `a, b`); the names go in `class_table`, logged as an artifact."""
        out = {f"data/{split}_size": float(sum(c.values())) for split, c in self.counts.items()}
        for split, by_name in self.counts.items():
            out |= {f"data/{split}/class{i}": float(by_name[name]) for i, name in enumerate(self.class_names)}
        return out

    def class_table(self) -> str:
        """JSON list of {index, name, <split>: count}: what `data/<split>/class<i>` means."""
        rows = [
            {"index": i, "name": name} | {split: by_name[name] for split, by_name in self.counts.items()}
            for i, name in enumerate(self.class_names)
        ]
        return json.dumps(rows, ensure_ascii=False, indent=1)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = _IndexBatches(*self.splits[split])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Each rank takes its shard itself (the Trainer runs with use_distributed_sampler=False:
            # Lightning would swap in a per-image sampler and break the whole-batch gather).
            # Train shards are padded to equal length (ranks must step together); eval shards are
            # strided and unpadded, so no test image counts twice.
            rank, world = dist.get_rank(), dist.get_world_size()
            order = DistributedSampler(dataset, seed=self.seed) if train else range(rank, len(dataset), world)
        elif train:
            order = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        else:
            order = SequentialSampler(dataset)
        return DataLoader(
            dataset,
            sampler=_EpochBatches(order, self.batch_size, fold_single=train),
            batch_size=None,  # the sampler yields whole index batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=BatchTransform(self.spec, self.augment if train else "none"),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def build_datamodule(cfg: DictConfig, spec: InputSpec, seed: int) -> TransferDataModule:
    """Validate, decode the source once (bad data fails here, not mid-training), split, subset."""
    cfg = _data_group(cfg)
    validate_data_config(cfg)
    data = SOURCES[cfg.source](cfg, spec)
    check_channels(data.images.shape[1], spec)
    keep, names = select_classes(data, cfg.get("classes"))
    labels = relabel(data.labels[keep], data.class_names, names)
    given = None if data.split is None else data.split[keep]
    split = assign_splits(
        labels,
        given,
        float(cfg.get("val_fraction", 0.15)),
        float(cfg.get("test_fraction", 0.15)),
        int(cfg.get("split_seed", 0)),
        names,
    )
    spc = cfg.get("samples_per_class")
    fraction = cfg.get("fraction")
    train = subset_train(
        np.flatnonzero(split == TRAIN),
        labels,
        names,
        seed,
        fraction=1.0 if fraction is None else float(fraction),
        samples_per_class=None if spc is None else int(spc),
    )
    chosen = {TRAIN: train, VAL: np.flatnonzero(split == VAL), TEST: np.flatnonzero(split == TEST)}
    tensors = {}
    for sid, idx in chosen.items():
        images = resize_cached(torch.from_numpy(np.ascontiguousarray(data.images[keep[idx]])), spec)
        tensors[SPLIT_NAMES[sid]] = (images, torch.from_numpy(labels[idx]))
    return TransferDataModule(
        tensors,
        names,
        spec,
        seed,
        batch_size=int(cfg.get("batch_size", 64)),
        num_workers=int(cfg.get("num_workers", 0)),
        augment=str(cfg.get("augment", "none")),
        subset_hash=indices_hash(keep[train]),
        skipped=data.skipped,
        train_indices=keep[train],
    )
