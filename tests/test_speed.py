"""trainer.precision / deterministic (auto by device), channels_last and compile."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from transferlab.config import compose_config, validate
from transferlab.data import build_datamodule
from transferlab.errors import ConfigError
from transferlab.transfer import speed
from transferlab.transfer.backbone import create_backbone, input_spec
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages


def trainer_cfg(**values):
    return OmegaConf.create({"accelerator": "auto", "precision": "auto", "deterministic": "auto", **values})


@pytest.mark.parametrize(("cuda", "expected"), [(False, ("32-true", True)), (True, ("bf16-mixed", False))])
def test_auto_precision_and_determinism_follow_the_device(monkeypatch, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = trainer_cfg()
    assert (speed.precision(cfg), speed.deterministic(cfg)) == expected
    cpu = trainer_cfg(accelerator="cpu")
    assert (speed.precision(cpu), speed.deterministic(cpu)) == ("32-true", True)
    fixed = trainer_cfg(precision="16-mixed", deterministic=False)
    assert (speed.precision(fixed), speed.deterministic(fixed)) == ("16-mixed", False)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.deterministic=sometimes", "trainer.deterministic"),
        ("trainer.channels_last=yes", "trainer.channels_last"),
        ("trainer.compile=3", "trainer.compile"),
        ("trainer.compile=inductr", "trainer.compile"),
    ],
)
def test_bad_speed_options_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config(["backbone.weights=scratch", override]))


def fit_two_steps(tmp_path, *overrides: str):
    """A real fit of test_resnet on 32 px animals for two steps with the given trainer options."""
    cfg = compose_config(["backbone.weights=scratch", "data.samples_per_class=16", "data.batch_size=16", *overrides])
    backbone = create_backbone(cfg.backbone)
    spec = input_spec(backbone.model, cfg.backbone)
    data = build_datamodule(cfg.data, spec, 0, cache_dir=tmp_path)
    module = TransferModule(
        backbone.model, map_stages(backbone.model), data.num_classes, (3, 32, 32), cfg.finetune, cfg.optim
    )
    speed.apply_speedups(module, data, cfg.trainer)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("batch", batch[0])
            seen["loss"] = float(outputs["loss"])

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        precision=speed.precision(cfg.trainer),
        deterministic=speed.deterministic(cfg.trainer),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Probe()],
    )
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(torch.tensor(seen["loss"]))
    return module, seen, trainer


def test_bf16_mixed_trains_on_cpu(tmp_path):
    module, seen, trainer = fit_two_steps(tmp_path, "trainer.precision=bf16-mixed")
    assert trainer.precision == "bf16-mixed"
    assert next(module.parameters()).dtype == torch.float32  # master weights stay fp32


def test_channels_last_model_and_batches(tmp_path):
    module, seen, _ = fit_two_steps(tmp_path, "trainer.channels_last=true", "data.augment_on=device")
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert seen["batch"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compile_trains_on_cpu(tmp_path):
    module, _, _ = fit_two_steps(tmp_path, "trainer.compile=true")
    assert module._compiled_call_impl is not None
    assert "backbone.conv1.0.weight" in module.state_dict() or any(
        k.startswith("backbone.") for k in module.state_dict()
    )
