"""Fail fast on services that are not there: one short probe instead of minutes of retries.

MLflow retries a dead HTTP store for minutes (7 retries, backoff factor 2, 120 s timeout) and
timm's Hugging Face download ~50 s offline (shared NOTES). A probe runs once per process and
URI, before any data is decoded; a sweep's CLI probes once for all its jobs.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig

from transferlab.errors import ConfigError

STORE_TIMEOUT_S = 5.0
HUB_TIMEOUT_S = 3.0
HUB_FIX = (
    "use backbone.weights=source (the offline source task), scratch, or a local file "
    "(backbone.weights=/path/to/weights.safetensors)"
)
_reachable: set[str] = set()


def limit_http_retries() -> None:
    """Bound each MLflow HTTP call (no library retries, 30 s timeout) unless the user chose
    otherwise: the tracker buffers failed writes and retries them itself (logbuffer.py)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _error_within(call: Callable[[], object], seconds: float) -> BaseException | None:
    """Run `call` in a daemon thread: DNS lookups ignore socket timeouts, a thread does not."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # reported to the caller, not raised in the thread
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else TimeoutError(f"no answer in {seconds:.0f} s")


def _get(url: str, timeout: float) -> None:
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # noqa: S310 (http(s) only)
    except urllib.error.HTTPError:  # an HTTP status (401, 404, ...) means something answered
        return


def _reason(err: BaseException) -> str:
    inner = getattr(err, "reason", None)
    return str(inner or err).splitlines()[0][:120]


def check_store(uri: str) -> None:
    """The tracking store answers (HTTP) or its folder exists (SQLite); one line otherwise."""
    if uri in _reachable:
        return
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        limit_http_retries()
        err = _error_within(lambda: _get(uri.rstrip("/") + "/health", STORE_TIMEOUT_S), STORE_TIMEOUT_S + 1)
        if err is not None:
            raise ConfigError(
                f"tracking store {uri} is unreachable ({_reason(err)}): start it "
                "(mlflow server --host 127.0.0.1 --port PORT) or set MLFLOW_TRACKING_URI / tracking.uri "
                "to a reachable store, e.g. sqlite:///mlflow.db"
            )
    elif parsed.scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(
                f"tracking store {uri}: folder {folder} does not exist: create it or set MLFLOW_TRACKING_URI"
            )
    _reachable.add(uri)


def check_writable(
    folder: Path, what: str, fix: str = "or set tracking.artifact_root to a writable folder in a new study"
) -> None:
    """Create `folder` and write a probe file in it: a full disk or a read-only location fails
    here, before a run exists, not in the middle of logging one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".transferlab-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{what} {folder} is not writable ({err.strerror or err}): free space or fix its permissions, {fix}"
        ) from err


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Offline mode for this process and its children (huggingface_hub reads the variable at
    import, so its module constant is set too)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def ensure_hub_or_offline() -> bool:
    """True when the model hub answers within seconds; else switch to offline mode (weights
    already in the local Hugging Face cache still load) and say so in one line."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint in _reachable:
        return True
    err = _error_within(lambda: _get(endpoint, HUB_TIMEOUT_S), HUB_TIMEOUT_S + 1)
    if err is None:
        _reachable.add(endpoint)
        return True
    go_offline()
    print(
        f"model hub {endpoint} is unreachable ({_reason(err)}): offline, only locally cached weights load; {HUB_FIX}",
        flush=True,
    )
    return False


def check_devices(trainer: DictConfig) -> None:
    """`trainer.devices` against what this node has: Lightning would fail later with a traceback
    (GPUs) or start one process per requested CPU device (64 processes on a 2-core machine)."""
    import torch

    devices, accelerator = trainer.devices, str(trainer.accelerator)
    if devices in (None, "auto", -1, "-1"):
        return
    wanted = len(devices) if isinstance(devices, list | ListConfig) else int(devices)
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible: use trainer.accelerator=cpu or auto"
        )
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    have, unit = (gpus, "GPU(s)") if on_gpu else (os.cpu_count() or 1, "CPU cores")
    highest = max(int(d) + 1 for d in devices) if isinstance(devices, list | ListConfig) else wanted
    if highest > have:
        raise ConfigError(f"trainer.devices={devices} but this node has {have} {unit}: use at most {have}")
