"""The cache layer: built once, verified, rebuilt when damaged, never half-visible."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from transferlab.cache import cache_key, ensure, verify


def _builder(calls: list[int], payload: bytes = b"x" * 1000):
    def build(folder: Path) -> dict:
        calls.append(1)
        (folder / "data.bin").write_bytes(payload)
        return {"rows": 10}

    return build


def test_built_once_then_reused(tmp_path):
    calls: list[int] = []
    first = ensure(tmp_path, "data", "k1", _builder(calls))
    second = ensure(tmp_path, "data", "k1", _builder(calls))
    assert first == second
    assert calls == [1]
    assert json.loads((first / "manifest.json").read_text())["meta"] == {"rows": 10}


def test_truncated_file_is_rebuilt(tmp_path):
    calls: list[int] = []
    folder = ensure(tmp_path, "data", "k1", _builder(calls))
    (folder / "data.bin").write_bytes(b"x" * 10)  # as after a crash or a full disk
    assert verify(folder, deep=False) is not None
    ensure(tmp_path, "data", "k1", _builder(calls))
    assert calls == [1, 1]
    assert (folder / "data.bin").stat().st_size == 1000


def test_same_size_corruption_needs_deep_check(tmp_path):
    folder = ensure(tmp_path, "data", "k1", _builder([]))
    (folder / "data.bin").write_bytes(b"y" * 1000)
    assert verify(folder, deep=False) is None
    assert "sha256" in verify(folder, deep=True)


def test_failed_build_leaves_nothing(tmp_path):
    def broken(folder: Path) -> dict:
        (folder / "half.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ensure(tmp_path, "data", "k1", broken)
    assert [p.name for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock")] == []


def test_parallel_callers_build_once(tmp_path):
    calls: list[int] = []
    threads = [threading.Thread(target=ensure, args=(tmp_path, "data", "k1", _builder(calls))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_key_depends_on_every_part():
    assert cache_key("a", {"x": 1}) != cache_key("a", {"x": 2})
    assert cache_key("a", {"x": 1, "y": 2}) == cache_key("a", {"y": 2, "x": 1})
