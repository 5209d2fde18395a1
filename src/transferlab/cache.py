"""Computed once, keyed, verified, reused: the one cache layer for prepared data, cached
features and source models.

An entry is a folder `<root>/<kind>/<key>/` whose `manifest.json` (size and sha256 of every file,
plus free-form metadata) is written last. Builds run in a private temporary folder under one file
lock per entry and are renamed into place, so a reader never sees half an entry; an entry whose
files disagree with its manifest (a crash, a full disk, a truncated copy) is discarded and rebuilt.
The lock is `filelock.FileLock` (fcntl), which Linux maps to POSIX locks on NFS as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

MANIFEST = "manifest.json"


def cache_key(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts (configs, hashes, versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record every file's size and hash; written last, so its presence means 'complete'."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, "meta": meta or {}, "created": time.time()}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(folder: Path, deep: bool = True) -> str | None:
    """None when the entry is complete and intact, else why not. `deep=False` checks sizes only
    (catches truncation without reading gigabytes)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "no readable manifest"
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {info['size']}"
        if deep and file_digest(path) != info["sha256"]:
            return f"{name} does not match its sha256"
    return None


def entry_dir(root: Path | str, kind: str, key: str) -> Path:
    return Path(root).expanduser() / kind / key


def ensure(
    root: Path | str,
    kind: str,
    key: str,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    deep: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> Path:
    """The verified folder of entry `kind/key`, built by `build(tmp_folder) -> meta` when missing
    or corrupt. Parallel callers (jobs, ranks, sweeps) build it once; the others wait and reuse."""
    folder = entry_dir(root, kind, key)
    say = on_event or (lambda message: None)
    if verify(folder, deep) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        problem = verify(folder, deep)
        if problem is None:  # another process built it while we waited
            return folder
        if folder.exists():
            say(f"cache {kind}/{key} is damaged ({problem}): rebuilding")
            shutil.rmtree(folder)
        tmp = folder.parent / f".{key}.tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            meta = build(tmp)
            write_manifest(tmp, meta)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
