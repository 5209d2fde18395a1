"""Frozen features computed once: a head on a frozen backbone needs its forward once per image,
not once per image per epoch per job.

While a phase trains only the head (probe, truncated probe, the head phase of head_then_all) and
the inputs are deterministic (no random augmentation), the frozen backbone's pooled outputs are
computed once per (data split, backbone weights, cut point, input spec, precision, code version)
through `cache.ensure` (keyed, locked, verified, atomic) and the head trains on them, batch for
batch in the same order as the uncached run. Every job of a sweep that shares the frozen part
(other seeds' heads, LRs, head shapes) reads the same entry; parallel jobs build it once.

Partial freezes (first k stages frozen, later ones trained) are not cached: resuming a forward
from the middle of the network needs per-family code (timm's `forward_intermediates` always runs
from the input), so they run as before and the log says so once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferlab import console, tags
from transferlab.cache import cache_key, ensure
from transferlab.errors import ConfigError
from transferlab.transfer import speed
from transferlab.transfer.compute import LayerCost, forward_flops, layer_costs
from transferlab.transfer.module import TransferModule

KIND = "features"
FORMAT_VERSION = 1  # bump when the stored layout or the pooling changes
IN_MEMORY_BYTES = 1 << 29  # feature sets up to 512 MiB are read into memory, larger ones memory-mapped
# Data fields that change neither which images a split holds nor how they look to the backbone.
_DATA_FIELDS_IGNORED = {"name", "batch_size", "num_workers", "augment", "download", "fraction", "samples_per_class"}
_BACKBONE_IGNORED = {"weights", "source", "source_overrides"}  # the weights digest stands for them
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_FULL_PRECISION = {"32-true", "32", "64-true", "64"}


# --- identity ---------------------------------------------------------------------------------
@functools.cache
def code_version() -> str:
    """Hash of transferlab's own source files: any code change invalidates cached features."""
    package = Path(__file__).resolve().parents[1]  # the whole transferlab package
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """Hash of every tensor in the state dict: the same features need exactly the same weights,
    whichever file, source run or timm tag they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


def data_identity(data_cfg: DictConfig) -> dict:
    """The data config fields that decide which images a split holds and how they are decoded."""
    fields = OmegaConf.to_container(data_cfg, resolve=True)
    return {k: v for k, v in fields.items() if k not in _DATA_FIELDS_IGNORED}


def feature_identity(cfg: DictConfig, backbone: nn.Module, cut: object, spec: object) -> dict:
    """Everything frozen features depend on, except the split: code, libraries, architecture,
    exact weights, cut point, input spec, data set."""
    arch = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items() if k not in _BACKBONE_IGNORED}
    return {
        "format": FORMAT_VERSION,
        "code": code_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "arch": arch,
        "weights": weights_digest(backbone),
        "cut": cut,
        "spec": asdict(spec),
        "data": data_identity(cfg.data),
    }


def split_key(identity: dict, precision: str, data: pl.LightningDataModule, split: str) -> str:
    """Entry key of one split: val/test are shared by every seed and subset, train by equal subsets."""
    size = sum(data.counts[split].values())
    return cache_key(identity, str(precision), split, data.subset_hash if split == "train" else "", size)


# --- extraction -------------------------------------------------------------------------------
def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast a Lightning `precision` applies to the forward; ConfigError where unsupported."""
    if str(precision) in _FULL_PRECISION:
        return contextlib.nullcontext()
    if str(precision) in _AUTOCAST:
        return torch.autocast(device.type, dtype=_AUTOCAST[str(precision)])
    raise ConfigError(f"trainer.precision={precision} is not supported by the feature cache: use 32-true or *-mixed")


def pool(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] or [B, N, C] -> [B, C], as TransferModule pools a truncated backbone."""
    return fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap.mean(dim=1)


def _extract(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    outputs: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    with (
        torch.inference_mode(),
        precision_context(precision, device),
        console.step("building the feature cache", min_seconds=2.0) as advance,
    ):
        for x, y in batches:
            for name, value in forward(x.to(device, non_blocking=True)).items():
                outputs.setdefault(name, []).append(value.float().cpu().numpy())
            labels.append(y.cpu().numpy())
            advance(len(y))
    return {k: np.concatenate(v) for k, v in outputs.items()}, np.concatenate(labels).astype(np.int64)


@dataclass
class FeatureSet:
    """Cached features of one split: name -> [N, D] float32 (in memory or memory-mapped)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    folder: Path
    built: bool  # this process built the entry (and owns its FLOPs)
    build_flops: float
    mapped: bool = False  # memory-mapped from disk rather than read into memory


def cached_features(
    root: Path | str,
    key: str,
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    *,
    device: torch.device,
    precision: str = "32-true",
    flops_per_sample: float | Callable[[], float] = 0.0,
    on_event: Callable[[str], None] | None = None,
) -> FeatureSet:
    """Read entry `features/<key>`, building it first (once across processes) by running
    `forward` over `batches()` on `device`. `flops_per_sample` (or a function giving it, called
    only on a build) prices the build."""
    built: list[int] = []

    def build(folder: Path) -> dict:
        arrays, labels = _extract(forward, batches(), device, precision)
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        np.save(folder / "labels.npy", labels)
        built.append(len(labels))
        return {"names": sorted(arrays), "samples": len(labels), "device": str(device), "precision": str(precision)}

    folder = ensure(root, KIND, key, build, deep=False, on_event=on_event)
    names = [p.stem for p in sorted(folder.glob("*.npy")) if p.stem != "labels"]
    size = sum((folder / f"{n}.npy").stat().st_size for n in names)
    mode = None if size <= IN_MEMORY_BYTES else "c"  # copy-on-write map: torch wants writable arrays
    features = {n: torch.from_numpy(np.load(folder / f"{n}.npy", mmap_mode=mode)) for n in names}
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    flops = (flops_per_sample() if callable(flops_per_sample) else flops_per_sample) * built[0] if built else 0.0
    return FeatureSet(features, labels, folder, bool(built), flops, mode is not None)


def stage_forward(backbone: nn.Module, feature_indices: dict[str, int]) -> Callable:
    """Forward returning the pooled output of every named feature index, in one pass."""
    order = sorted(set(feature_indices.values()))

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmaps = backbone.forward_intermediates(x, indices=order, intermediates_only=True)
        by_index = dict(zip(order, fmaps, strict=True))
        return {name: pool(by_index[i]) for name, i in feature_indices.items()}

    return forward


# --- training a head on cached features --------------------------------------------------------
class _IndexedRows(Dataset):
    """Indexed by a list of indices, like the data module's batches: one gather per batch."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[idx], self.labels[idx]


def same_batches(rows: Dataset, original: DataLoader) -> DataLoader:
    """A loader over `rows` yielding exactly the index batches of `original` (same sampler
    object: same shuffle seed, DDP shard and per-epoch reshuffle)."""
    sampler = original.batch_sampler if original.batch_sampler is not None else original.sampler
    return DataLoader(rows, sampler=sampler, batch_size=None)


class FeatureDataModule(pl.LightningDataModule):
    """Cached features in place of images, batched exactly like the data module it wraps.
    Splits are built on first use, so a head phase never pays for test features."""

    def __init__(self, data: pl.LightningDataModule, load: Callable[[str], FeatureSet]) -> None:
        super().__init__()
        self.data = data
        self.load = load
        self.loaded: dict[str, FeatureSet] = {}  # Lightning asks for the train loader twice per fit

    def split(self, name: str) -> FeatureSet:
        """One split's features, loaded (or built) once."""
        return self.loaded.get(name) or self.loaded.setdefault(name, self.load(name))

    def _loader(self, split: str, original: DataLoader) -> DataLoader:
        found = self.split(split)
        (features,) = found.features.values()
        return same_batches(_IndexedRows(features, found.labels), original)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.data.train_dataloader())

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.data.val_dataloader())

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.data.test_dataloader())


def head_costs(costs: list[LayerCost]) -> list[LayerCost]:
    """The layers a job on cached features still runs: its head."""
    return [c for c in costs if c.name == "head" or c.name.startswith("head.")]


def backbone_flops(costs: list[LayerCost]) -> float:
    """Forward FLOPs per sample of the (kept) backbone: the cost of building one feature row."""
    return forward_flops([c for c in costs if c.name.startswith("backbone.") or c.name == "backbone"])


def device_for(accelerator: str) -> torch.device:
    """Where a stand-alone extraction runs: the GPU when there is one and the config allows it."""
    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model in eval mode on `device` for a frozen forward; modes and device restored after."""
    modes = {m: m.training for m in model.modules()}
    home = next(model.parameters()).device
    model.eval().to(device)
    try:
        yield model
    finally:
        model.to(home)
        for m, training in modes.items():
            m.train(training)


def why_not_cached(mode: str, trainable: frozenset[int], augment: str) -> str | None:
    """None when a phase can train on cached features, else the reason it cannot."""
    if mode == "off":
        return "finetune.cache_features=off"
    if trainable and 0 not in trainable:
        return (
            "a partial freeze is not cached: training the later stages on cached early features needs a "
            "forward from the middle of the network, which timm offers no generic way to run"
        )
    if trainable:
        return "every stage trains"
    if augment != "none" and mode != "unaugmented":
        return (
            f"data.augment={augment} randomises the inputs the frozen backbone sees, so its outputs are not fixed "
            "(finetune.cache_features=unaugmented trains head-only phases on unaugmented features)"
        )
    return None


def _plain_step() -> Callable:
    return TransferModule.training_step


class PhaseFeatures:
    """Per job: for each phase, the data the trainer fits on (cached features or images), the
    layers it pays for, and the one-off build cost this job incurred."""

    def __init__(self, cfg: DictConfig, module: nn.Module, data: pl.LightningDataModule, costs: list[LayerCost]):
        self.mode = str(cfg.finetune.get("cache_features", "auto"))  # auto | unaugmented | off (schema.py)
        self.cfg, self.module, self.data, self.costs = cfg, module, data, costs
        self.build_flops = 0.0
        self.outcomes: list[str] = []  # one per cached split read: built | reused
        self.reasons: list[str] = []

    def datamodule(self, phase_name: str, trainable: frozenset[int], trainer: pl.Trainer) -> pl.LightningDataModule:
        """What `trainer.fit` should run this phase on; sets the module to take features or images."""
        reason = why_not_cached(self.mode, trainable, str(self.data.augment))
        precision = str(trainer.precision)
        if reason is None and precision not in _FULL_PRECISION | set(_AUTOCAST):
            reason = f"trainer.precision={precision} is not supported by the feature cache"
        if reason is None and type(self.module).training_step is not _plain_step():
            reason = f"finetune.strategy={self.cfg.finetune.strategy} trains on the images themselves (its own step)"
        self.module.on_features = reason is None
        if reason is not None:
            if reason not in self.reasons and reason != "every stage trains":
                print(f"feature cache: not used for phase {phase_name}: {reason}", flush=True)
            self.reasons.append(reason)
            return self.data
        dropped = (
            f" of unaugmented images (data.augment={self.data.augment} skipped)" if self.data.augment != "none" else ""
        )
        print(f"feature cache: phase {phase_name} trains the head on cached frozen features{dropped}", flush=True)
        identity = feature_identity(self.cfg, self.module.backbone, self.module.feature_index, self.data.spec)
        device = trainer.strategy.root_device

        def load(split: str) -> FeatureSet:
            with _eval_on(self.module, device) as model:
                found = cached_features(
                    self.cfg.cache_dir,
                    split_key(identity, precision, self.data, split),
                    lambda x: {"pooled": model.features(x)},
                    lambda: iter(self.data.ordered_dataloader(split)),
                    device=device,
                    precision=precision,
                    flops_per_sample=backbone_flops(self.costs),
                    on_event=lambda m: print(m, flush=True),
                )
            self.build_flops += found.build_flops
            self.outcomes.append("built" if found.built else "reused")
            return found

        return FeatureDataModule(self.data, load)

    def train_costs(self) -> list[LayerCost]:
        """Layers the current phase runs per training sample."""
        return head_costs(self.costs) if getattr(self.module, "on_features", False) else self.costs

    def tags(self) -> dict[str, str]:
        if self.outcomes:
            state = "built" if "built" in self.outcomes else "reused"
        else:
            state = "unused: " + (next((r for r in self.reasons if r != "every stage trains"), "every stage trains"))
        return {tags.CACHE_FEATURES: self.mode, tags.FEATURE_CACHE: state[:500]}

    def metrics(self) -> dict[str, float]:
        """Build cost, attributed once: to the job that ran the forward (0 for jobs that reused it)."""
        return {"compute/cache_build_flops": self.build_flops}


# --- every stage at once (for `transferlab advise`) --------------------------------------------
def extract_stage_features(
    cfg: DictConfig,
    backbone: nn.Module,
    stages: object,
    data: pl.LightningDataModule,
    splits: tuple[str, ...] = ("train", "val"),
    device: torch.device | None = None,
) -> dict[str, FeatureSet]:
    """Pooled frozen features at the end of every stage that has a timm feature output, all in one
    forward pass per split, cached like a probe's (key cut: "all-stages"). Returns split ->
    FeatureSet whose `features` map stage name -> [N, C]."""
    if not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"{type(backbone).__name__} has no forward_intermediates: pick a timm model that has one")
    device = device or device_for(cfg.trainer.accelerator)
    precision = speed.precision(cfg.trainer)  # `auto` resolved for this device
    named = {stages.names[s]: i for s, i in sorted(stages.feature_index.items())}
    if not named:
        raise ConfigError(f"{type(backbone).__name__} has no per-stage feature outputs: pick another timm model")
    identity = feature_identity(cfg, backbone, "all-stages", data.spec)
    per_sample = functools.cache(lambda: _forward_flops(backbone, data.spec))
    out = {}
    with _eval_on(backbone, device) as model:
        for split in splits:
            out[split] = cached_features(
                cfg.cache_dir,
                split_key(identity, precision, data, split),
                stage_forward(model, named),
                lambda split=split: iter(data.ordered_dataloader(split)),
                device=device,
                precision=precision,
                flops_per_sample=per_sample,
            )
            out[split].features = {n: out[split].features[n] for n in named}  # forward order
    return out


def _forward_flops(backbone: nn.Module, spec: object) -> float:
    device = next(backbone.parameters()).device
    return forward_flops(layer_costs(backbone, torch.zeros(1, spec.in_chans, spec.size, spec.size, device=device)))
