"""Prepared data: each source decoded once per (source, files, stored size, interpolation) into a
uint8 file in the shared cache (`cache.ensure`: keyed, locked, verified, atomic) and reused by
every job, rank and worker of every sweep. Small stores are read into RAM (the fast path); larger
ones are read per batch with `pread`, so memory stays at a few batches however big the data.

Why a raw uint8 file and not LitData (`optimize` + `StreamingDataset`): see README "Prepared data".
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from transferlab import cache, console
from transferlab.data.base import SourceData, SourceFiles, check_array_channels, data_channels, fit_pil
from transferlab.data.sources import SOURCES
from transferlab.data.transforms import InputSpec, resize_cached
from transferlab.errors import DataError

STORE_VERSION = 1  # bump when the stored bytes change meaning
IMAGES = "images.u8"
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_SKIP_HINT = "set data.skip_corrupt=true to skip unreadable files"
_CHUNK = 1024  # images decoded / resized per step: bounds memory while building


class DiskRows:
    """uint8 rows [N, *shape] of a raw file, read on demand with `os.preadv` straight into the
    batch buffer: no mapping, so resident memory is one batch, not the pages touched so far.
    Picklable for DataLoader workers (each process opens its own descriptor)."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = Path(path), tuple(shape)
        self.row_bytes = int(np.prod(shape[1:]))
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def _descriptor(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        fd = self._descriptor()
        for i, row in enumerate(rows):
            if os.preadv(fd, [memoryview(out[i]).cast("B")], int(row) * self.row_bytes) != self.row_bytes:
                raise DataError(f"{self.path} is shorter than its manifest says: delete it to rebuild")
        return out


@dataclass
class Prepared:
    """A source as uint8 [N, C, S, S] images (in RAM or on disk) plus labels; same fields as
    SourceData, so splits and subsets work on either."""

    images: np.ndarray | DiskRows
    labels: np.ndarray
    class_names: list[str]
    split: np.ndarray | None
    skipped: int = 0
    in_ram: bool = True


# --- decoding --------------------------------------------------------------------------------


def decode_workers(n: int) -> int:
    """Threads for decoding: Pillow releases the GIL while decoding and resizing, so threads use
    every core without pickling sources into processes; tiny sets stay single-threaded."""
    return 1 if n < 64 else max(1, len(os.sched_getaffinity(0)))


def decode_one(
    files: SourceFiles, i: int, spec: InputSpec, channels: int = 3
) -> tuple[np.ndarray | None, bool, str | None]:
    """-> (uint8 [channels, S, S] or None, is greyscale, error name). A file that decodes but
    lacks the channels asked for is a DataError, never skipped as unreadable."""
    try:
        with files.open(i) as img:
            img.load()
            return fit_pil(img, spec, channels, files.name(i)), img.mode in _GREY_MODES, None
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        return None, False, type(err).__name__


def decode_files(
    files: SourceFiles, spec: InputSpec, out: np.ndarray, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decode every file into `out` (uint8 [N, C, S, S], RAM or memmap; C = data.channels) with a
    thread pool, one chunk at a time -> (ok mask, greyscale mask, {index: error})."""
    n, channels = len(files.labels), out.shape[1]
    ok, grey, bad = np.zeros(n, bool), np.zeros(n, bool), {}
    with (
        ThreadPoolExecutor(workers or decode_workers(n)) as pool,
        console.step(f"decoding {n} images", total=n, min_seconds=2.0) as advance,
    ):
        for start in range(0, n, _CHUNK):
            idx = range(start, min(n, start + _CHUNK))
            decoded = pool.map(lambda j: decode_one(files, j, spec, channels), idx)
            for i, (arr, is_grey, err) in zip(idx, decoded, strict=True):
                if arr is None:
                    bad[i] = err
                    continue
                out[i], ok[i], grey[i] = arr, True, is_grey
            advance(len(idx))
    return ok, grey, bad


def _resized_chunks(images: np.ndarray, spec: InputSpec) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(images), _CHUNK):
        chunk = torch.from_numpy(np.array(images[start : start + _CHUNK], copy=True))  # memmaps are read-only
        yield start, resize_cached(chunk, spec).numpy()


def _check_bad(files: SourceFiles, bad: dict[int, str], skip: bool) -> None:
    if bad and not skip:
        i = min(bad)
        raise DataError(f"cannot read image {files.name(i)} ({bad[i]}): fix or delete it, or {_SKIP_HINT}")


def _check_classes(labels: np.ndarray, ok: np.ndarray, class_names: list[str]) -> None:
    empty = sorted(set(range(len(class_names))) - set(labels[ok].tolist()))
    if empty:
        raise DataError(f"no readable images for class {class_names[empty[0]]!r}: add valid images")


def _warn_skipped(bad: dict, files: SourceFiles) -> None:
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s), e.g. {files.name(min(bad))}", stacklevel=3)


def decode_in_memory(cfg: DictConfig, spec: InputSpec) -> Prepared:
    """No cache folder: decode straight into RAM (tests, one-off runs)."""
    found, channels = SOURCES[cfg.source](cfg, spec), data_channels(cfg)
    if isinstance(found, SourceData):
        check_array_channels(found, channels, str(cfg.source))
        chunks = [chunk for _, chunk in _resized_chunks(found.images, spec)]
        images = np.concatenate(chunks) if chunks else found.images
        return Prepared(images, found.labels, found.class_names, found.split, found.skipped)
    size = spec.store_size
    out = np.empty((len(found.labels), channels, size, size), dtype=np.uint8)
    ok, grey, bad = decode_files(found, spec, out)
    _check_bad(found, bad, bool(cfg.get("skip_corrupt", False)))
    _check_classes(found.labels, ok, found.class_names)
    _warn_skipped(bad, found)
    images = out[ok][:, :1] if channels == 3 and grey[ok].all() else out[ok]  # all greyscale: keep one channel
    split = None if found.split is None else found.split[ok]
    return Prepared(np.ascontiguousarray(images), found.labels[ok], found.class_names, split, len(bad))


# --- the on-disk store -----------------------------------------------------------------------


def source_fingerprint(cfg: DictConfig) -> str:
    """Identity of the source's files without decoding them: every file's path, size and
    mtime under data.root (a changed, added or deleted file makes a new store)."""
    if cfg.get("root") is None:
        return str(cfg.source)
    root = Path(str(cfg.root)).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode())
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                digest.update(f"{os.path.join(dirpath, name)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def store_key(cfg: DictConfig, spec: InputSpec) -> str:
    """One store per (source files, stored size, interpolation, channels): every class subset,
    fraction, seed and model of that input size shares it. Channels join the key only when not
    3, so stores made before data.channels existed keep their keys."""
    channels = data_channels(cfg)
    extra = () if channels == 3 else (channels,)
    return cache.cache_key(
        STORE_VERSION, str(cfg.source), source_fingerprint(cfg), spec.store_size, spec.interpolation, *extra
    )


def _raw(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A headerless uint8 file mapped for writing: readers compute offsets without parsing."""
    if shape[0] == 0:
        path.write_bytes(b"")
        return np.zeros(shape, np.uint8)
    return np.memmap(path, np.uint8, "w+", shape=shape)


def _build_store(cfg: DictConfig, spec: InputSpec, folder: Path) -> dict:
    """Decode the source into folder/images.u8, chunk by chunk (never all of it in RAM)."""
    found, channels = SOURCES[cfg.source](cfg, spec), data_channels(cfg)
    n, size = len(found.labels), spec.store_size
    meta = {"class_names": list(found.class_names), "bad": {}, "skipped": 0}
    if isinstance(found, SourceData):
        check_array_channels(found, channels, str(cfg.source))
        shape = (n, found.images.shape[1], size, size)
        out = _raw(folder / IMAGES, shape)
        for start, chunk in _resized_chunks(found.images, spec):
            out[start : start + len(chunk)] = chunk
        ok, meta["skipped"] = np.ones(n, bool), int(found.skipped)
    else:
        shape = (n, channels, size, size)
        out = _raw(folder / IMAGES, shape)
        ok, grey, bad = decode_files(found, spec, out)
        meta["bad"] = {found.name(i): err for i, err in sorted(bad.items())}
        if n and channels == 3 and grey[ok].all():  # all greyscale: keep one channel
            shape = (n, 1, size, size)
            one = _raw(folder / "grey.u8", shape)
            for start in range(0, n, _CHUNK):
                one[start : start + _CHUNK] = out[start : start + _CHUNK, :1]
            one.flush()
            del out, one
            (folder / "grey.u8").replace(folder / IMAGES)
            out = None
    if isinstance(out, np.memmap):
        out.flush()
    np.save(folder / "labels.npy", found.labels)
    np.save(folder / "ok.npy", ok)
    if found.split is not None:
        np.save(folder / "split.npy", found.split)
    return meta | {"shape": list(shape), "version": STORE_VERSION, "source": str(cfg.source)}


def prepare(
    cfg: DictConfig,
    spec: InputSpec,
    cache_dir: Path | str | None,
    ram_budget_mb: float = 1024,
    on_event: Callable[[str], None] | None = None,
) -> Prepared:
    """The source's images, decoded at most once per cache folder. With no cache folder, decode
    into RAM. Bad files fail (or are skipped and counted) here, before any training."""
    if cache_dir is None:
        return decode_in_memory(cfg, spec)
    folder = cache.ensure(
        cache_dir, "data", store_key(cfg, spec), lambda tmp: _build_store(cfg, spec, tmp), deep=False, on_event=on_event
    )
    meta = cache.read_manifest(folder)["meta"]
    bad = meta["bad"]
    if bad and not cfg.get("skip_corrupt", False):
        name, err = next(iter(bad.items()))
        raise DataError(f"cannot read image {name} ({err}): fix or delete it, or {_SKIP_HINT}")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s), e.g. {next(iter(bad))}", stacklevel=2)
    labels, ok = np.load(folder / "labels.npy"), np.load(folder / "ok.npy")
    split = np.load(folder / "split.npy") if (folder / "split.npy").exists() else None
    _check_classes(labels, ok, meta["class_names"])
    shape = tuple(meta["shape"])
    keep = np.flatnonzero(ok)
    in_ram = np.prod(shape) <= ram_budget_mb * 2**20
    if in_ram:
        images = np.fromfile(folder / IMAGES, np.uint8).reshape(shape)
        images = images if len(keep) == len(ok) else images[keep]
    else:
        images = DiskRows(folder / IMAGES, shape)
        if len(keep) != len(ok):
            images = _Rows(images, keep)
    return Prepared(
        images,
        labels[keep],
        list(meta["class_names"]),
        None if split is None else split[keep],
        skipped=int(meta["skipped"]) + len(bad),
        in_ram=bool(in_ram),
    )


class _Rows:
    """A row subset of DiskRows (skipped files left out), indexed like an array."""

    def __init__(self, rows: DiskRows, keep: np.ndarray) -> None:
        self.rows, self.keep = rows, keep
        self.shape = (len(keep), *rows.shape[1:])

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx) -> np.ndarray:
        return self.rows[self.keep[np.asarray(idx)]]
