"""Config validation and the Lightning data module: prepare once, split, subset, batch.

Loaders yield uint8 batches; the float work (crop, augment, normalise) runs either in the
loader (`collate_fn`, CPU workers) or after the batch reached the accelerator
(`on_after_batch_transfer`), so a GPU step never waits on CPU float work."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from transferlab.data.base import PIL_MODES, SPLIT_NAMES, TEST, TRAIN, VAL, data_channels
from transferlab.data.sources import SOURCES
from transferlab.data.splits import (
    assign_splits,
    indices_hash,
    relabel,
    select_classes,
    subset_train,
)
from transferlab.data.store import DiskRows, Prepared, prepare
from transferlab.data.transforms import (
    AUGMENT_PRESETS,
    BatchTransform,
    InputSpec,
    as_uint8_batch,
    check_channels,
)
from transferlab.errors import ConfigError

_NEEDS_ROOT = set(SOURCES) - {"animals", "digits"}
# Where the float work runs: auto = on the accelerator when there is one, else in the loader.
AUGMENT_PLACES = ("auto", "loader", "device")


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
    if int(cfg.get("batch_size", 1)) < 1 or int(cfg.get("num_workers") or 0) < 0:
        raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0 (or null: auto)")
    crop_pct = cfg.get("crop_pct")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise ConfigError(f"data.crop_pct={crop_pct!r} must be in (0, 1] or null (the backbone's timm data config)")
    if cfg.get("augment_on", "auto") not in AUGMENT_PLACES:
        places = ", ".join(AUGMENT_PLACES)
        raise ConfigError(f"data.augment_on={cfg.get('augment_on')!r} is unknown: use one of {places}")
    if float(cfg.get("ram_budget_mb", 0)) < 0:
        raise ConfigError("data.ram_budget_mb must be >= 0 (0 = always read from disk)")
    channels = data_channels(cfg)
    if source == "imagefolder" and channels not in PIL_MODES:
        modes = ", ".join(f"{c} ({m})" for c, m in PIL_MODES.items())
        raise ConfigError(
            f"data.channels={channels} with data.source=imagefolder: image files give {modes}; "
            "save a stack with another channel count as .npy and use data=npy"
        )
    if source in _NEEDS_ROOT and cfg.get("root") is None:
        raise ConfigError(f"data.root is required for data.source={source}: set data.root=PATH")


class _IndexBatches(Dataset):
    """Indexed by a list of indices: one gather per batch instead of one per image. `images`
    is a uint8 tensor in RAM or rows read from the prepared store on disk."""

    def __init__(self, images: torch.Tensor | SplitRows, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[idx]
        return torch.from_numpy(images) if isinstance(images, np.ndarray) else images, self.labels[idx]


class SplitRows:
    """The rows of one split in a disk-backed store, indexed like a tensor (reads on demand)."""

    def __init__(self, store: DiskRows, rows: np.ndarray) -> None:
        self.store, self.rows = store, np.asarray(rows)
        self.shape = (len(self.rows), *store.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> np.ndarray:
        return self.store[self.rows[np.asarray(idx)]]


class _EpochBatches(BatchSampler):
    """Forwards Lightning's per-epoch `set_epoch` to a DistributedSampler inside, so shards reshuffle.

    `fold_single`: a last batch of one image joins the batch before it, because BatchNorm cannot
    train on one value per channel ("Expected more than 1 value per channel"); no image is dropped.
    """

    def __init__(
        self, sampler, batch_size: int, fold_single: bool = False, seed: int = 0, epoch_offset: int = 0
    ) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.fold_single = fold_single
        self.seed, self.epoch_offset = seed, epoch_offset

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
        """Lightning counts epochs from 0 in every `fit` (one per phase): shuffle by the run's
        global epoch, so no phase replays another's order."""
        epoch += self.epoch_offset
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        elif isinstance(getattr(self.sampler, "generator", None), torch.Generator):
            self.sampler.generator.manual_seed(self.seed * 1_000_003 + epoch)


class TransferDataModule(pl.LightningDataModule):
    """uint8 images for train/val/test (in RAM or read from the prepared store); batches come out
    normalised float32, transformed in the loader or on the device (`augment_on`)."""

    def __init__(
        self,
        splits: dict[str, tuple[torch.Tensor | SplitRows, torch.Tensor]],
        class_names: list[str],
        spec: InputSpec,
        seed: int,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: str = "none",
        subset_hash: str = "",
        skipped: int = 0,
        train_indices: np.ndarray | None = None,
        augment_on: str = "auto",
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
        self.augment_on = augment_on
        self.memory_format = torch.contiguous_format  # the runner sets channels_last
        self._transforms: dict[tuple, BatchTransform] = {}
        self.subset_hash = subset_hash
        self.skipped = skipped
        self.train_indices = train_indices  # source indices of the train subset (hashed above)
        self.epoch_offset = 0  # the run's epoch where the current phase starts (set by the runner)
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

    def transform(self, train: bool) -> BatchTransform:
        """One per mode, kept: its normalisation statistics reach the device once, not per batch."""
        key = (self.spec, self.augment if train else "none", self.memory_format)
        if key not in self._transforms:
            self._transforms[key] = BatchTransform(*key)
        return self._transforms[key]

    def on_device(self) -> bool:
        """Whether the float work runs after the transfer: `device`, or `auto` with an accelerator."""
        if self.augment_on != "auto":
            return self.augment_on == "device"
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type != "cpu"

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Crop/augment/normalise uint8 batches where they now live (the GPU, when there is one)."""
        images, labels = batch
        if images.dtype != torch.uint8:  # transformed in the loader already
            return batch
        train = self.trainer is not None and self.trainer.training
        return self.transform(train).normalise(images), labels

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
        on_device = self.on_device()
        return DataLoader(
            dataset,
            sampler=_EpochBatches(
                order, self.batch_size, fold_single=train, seed=self.seed, epoch_offset=self.epoch_offset
            ),
            batch_size=None,  # the sampler yields whole index batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=as_uint8_batch if on_device else self.transform(train),
            pin_memory=on_device and torch.cuda.is_available(),  # then Lightning copies non_blocking
        )

    def ordered_dataloader(self, split: str) -> DataLoader:
        """Every sample of `split` in index order, model-ready, never augmented or sharded: the
        deterministic pass that feature caching (features.py) computes frozen outputs from."""
        dataset = _IndexBatches(*self.splits[split])
        return DataLoader(
            dataset,
            sampler=BatchSampler(SequentialSampler(dataset), self.batch_size, drop_last=False),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=self.transform(train=False),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def _num_workers(cfg: DictConfig, in_ram: bool) -> int:
    """null = auto: none for data in RAM (a gather is cheap), every core for data read from disk."""
    if cfg.get("num_workers") is not None:
        return int(cfg.num_workers)
    return 0 if in_ram else min(8, len(os.sched_getaffinity(0)))


def _split(cfg: DictConfig, data: Prepared, seed: int) -> tuple[np.ndarray, list[str], np.ndarray, dict]:
    """Classes, val/test carving and the train subset, from labels alone (no image is read):
    -> (kept source rows, class names, their labels, {split id: indices into the kept rows})."""
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
    return keep, names, labels, {TRAIN: train, VAL: np.flatnonzero(split == VAL), TEST: np.flatnonzero(split == TEST)}


def check_data(
    cfg: DictConfig, spec: InputSpec, seed: int, cache_dir: Path | str | None = None
) -> tuple[list[str], dict[str, int]]:
    """Every check `build_datamodule` makes (root, layout, classes, readable files, channels, split
    sizes, samples per class) without reading images into memory: the store is decoded once (the
    job reuses it) and opened on disk. -> (class names, images per split). Run before a source
    model or teacher is trained, so bad data fails in seconds."""
    cfg = _data_group(cfg)
    validate_data_config(cfg)
    if cfg.get("crop_pct") is not None:
        spec = replace(spec, crop_pct=float(cfg.crop_pct))
    data = prepare(cfg, spec, cache_dir, ram_budget_mb=0)
    check_channels(data.images.shape[1], spec)
    _, names, _, chosen = _split(cfg, data, seed)
    return names, {SPLIT_NAMES[sid]: len(idx) for sid, idx in chosen.items()}


def build_datamodule(
    cfg: DictConfig, spec: InputSpec, seed: int, cache_dir: Path | str | None = None
) -> TransferDataModule:
    """Validate, prepare the source once (bad data fails here, not mid-training), split, subset.
    With `cache_dir`, the decoded source is shared by every job through the prepared store."""
    cfg = _data_group(cfg)
    validate_data_config(cfg)
    if cfg.get("crop_pct") is not None:
        spec = replace(spec, crop_pct=float(cfg.crop_pct))
    data = prepare(cfg, spec, cache_dir, float(cfg.get("ram_budget_mb", 1024)))
    check_channels(data.images.shape[1], spec)
    keep, names, labels, chosen = _split(cfg, data, seed)
    train = chosen[TRAIN]
    tensors = {}
    for sid, idx in chosen.items():
        rows = keep[idx]
        images = torch.from_numpy(data.images[rows]) if data.in_ram else SplitRows(data.images, rows)
        tensors[SPLIT_NAMES[sid]] = (images, torch.from_numpy(labels[idx]))
    return TransferDataModule(
        tensors,
        names,
        spec,
        seed,
        batch_size=int(cfg.get("batch_size", 64)),
        num_workers=_num_workers(cfg, data.in_ram),
        augment=str(cfg.get("augment", "none")),
        subset_hash=indices_hash(keep[train]),
        skipped=data.skipped,
        train_indices=keep[train],
        augment_on=str(cfg.get("augment_on", "auto")),
    )
