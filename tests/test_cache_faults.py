"""Damaged caches (a crash or a full disk mid-write) are detected and rebuilt, never loaded:
the prepared-data store and the feature cache here, the source model in test_lineage.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from test_data import RGB16, folder_cfg, write_images
from transferlab.cache import verify
from transferlab.data import build_datamodule
from transferlab.transfer.features import cached_features


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _only_entry(root: Path, kind: str) -> Path:
    (entry,) = [p for p in (root / kind).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return entry


def test_truncated_data_store_is_rebuilt_not_loaded(tmp_path, capsys) -> None:
    for k, cls in enumerate("abc"):
        write_images(tmp_path / "imgs" / cls, 10, k)
    cfg = folder_cfg(tmp_path / "imgs")
    first = build_datamodule(cfg, RGB16, seed=0, cache_dir=tmp_path / "cache")
    entry = _only_entry(tmp_path / "cache", "data")
    biggest = max((p for p in entry.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    _truncate(biggest)
    assert verify(entry, deep=False) is not None
    again = build_datamodule(cfg, RGB16, seed=0, cache_dir=tmp_path / "cache")
    assert verify(entry) is None  # rebuilt whole
    assert torch.equal(first.splits["train"][0], again.splits["train"][0])
    assert torch.equal(first.splits["test"][0], again.splits["test"][0])


def test_truncated_feature_cache_is_rebuilt_not_loaded(tmp_path) -> None:
    calls: list[int] = []

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(x))
        return {"stage1": x.flatten(1) * 2}

    def batches():
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            yield torch.rand(4, 3, 2, 2, generator=gen), torch.arange(4)

    kwargs = {"device": torch.device("cpu")}
    first = cached_features(tmp_path, "k1", forward, batches, **kwargs)
    assert first.built
    _truncate(first.folder / "stage1.npy")
    again = cached_features(tmp_path, "k1", forward, batches, **kwargs)
    assert again.built  # built a second time, not read from the damaged file
    assert calls == [4, 4, 4, 4, 4, 4]
    assert np.array_equal(again.features["stage1"].numpy(), first.features["stage1"].numpy())
    assert verify(again.folder) is None
