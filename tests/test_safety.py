"""Safe by default: pickles never run, logged configs from a shared store cannot name code or
choose where this machine writes, servers bind 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST
from transferlab.cli import main
from transferlab.config import compose_config, validate
from transferlab.errors import ConfigError
from transferlab.jobs.reproduce import check_targets, localize_paths
from transferlab.transfer.backbone import build_model, load_weights


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_without_running(tmp_path, cfg) -> None:
    marker = tmp_path / "PWNED"
    torch.save({"conv1.weight": Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="cannot be loaded safely") as err:
        load_weights(build_model(cfg.backbone, pretrained=False), tmp_path / "evil.pth")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_logged_config_cannot_choose_where_this_machine_writes(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    logged = compose_config(FAST)
    logged.cache_dir = "/etc/transferlab"
    logged.tracking.artifact_root = "/root/.ssh"
    logged.tracking.fallback_dir = "/usr/lib"
    local = localize_paths(logged.copy())
    defaults = compose_config([])
    assert local.cache_dir == defaults.cache_dir
    assert local.tracking.artifact_root == defaults.tracking.artifact_root
    assert local.tracking.fallback_dir == defaults.tracking.fallback_dir


def test_logged_config_cannot_download_outside_the_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    logged = compose_config([*FAST, "data=cifar10"])
    OmegaConf.update(logged, "data.download", True, force_add=True)
    logged.data.root = "/etc/cifar"
    with pytest.raises(ConfigError, match="outside"):
        localize_paths(logged.copy())
    logged.data.root = "data/cifar10"  # inside the working directory: allowed
    assert localize_paths(logged.copy()).data.root == "data/cifar10"


def test_logged_config_cannot_name_code() -> None:
    with pytest.raises(ConfigError, match="builtins.exec"):
        check_targets({"model": {"_target_": "builtins.exec"}})
    bad = compose_config(FAST)
    bad.optim.name = "os.system"  # names resolve through registries only
    with pytest.raises(ConfigError, match="optim.name"):
        validate(bad)


def test_ui_binds_localhost_unless_asked(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    commands: list[list[str]] = []

    class FakeServer:
        pid = 0

        def __init__(self, cmd, **kwargs) -> None:
            commands.append(cmd)

        def wait(self, timeout=None) -> int:
            return 0

    monkeypatch.setattr("subprocess.Popen", FakeServer)
    monkeypatch.setattr("subprocess.call", lambda cmd, **kwargs: FakeServer(cmd).wait())
    monkeypatch.setattr("signal.signal", lambda *args: None)
    assert main(["ui"]) == 0
    assert main(["ui", "--host", "0.0.0.0"]) == 0
    hosts = [cmd[cmd.index("--host") + 1] for cmd in commands]
    assert hosts == ["127.0.0.1", "0.0.0.0"]
