import math

import pytest
import pytorch_lightning as pl
import timm
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from transferlab.errors import ConfigError
from transferlab.finetune import Phase, lr_factor, plan_phases, stage_lr_mults, target_trainable
from transferlab.model import TransferModule
from transferlab.stages import map_stages

SIZE = 32

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")


@pytest.fixture(scope="module")
def stages():
    return map_stages(timm.create_model("test_resnet", pretrained=False, num_classes=0))


def ft(cfg, **overrides):
    return OmegaConf.merge(cfg.finetune, overrides)


# --- target_trainable ---------------------------------------------------------------------
def test_target_from_freeze_depth(cfg, stages):
    assert target_trainable(ft(cfg, freeze_depth=0), stages, 5) == frozenset(range(5))
    assert target_trainable(ft(cfg, freeze_depth=2), stages, 5) == frozenset({2, 3, 4})
    assert target_trainable(ft(cfg, freeze_depth=2), stages, 3) == frozenset({2})  # truncated
    assert target_trainable(ft(cfg, freeze_depth=5), stages, 5) == frozenset()
    assert target_trainable(ft(cfg, freeze_depth="all"), stages, 5) == frozenset()


def test_surgical_trainable_stages(cfg, stages):
    assert target_trainable(ft(cfg, trainable_stages=["stage1"], freeze_depth=3), stages, 5) == frozenset({1})
    assert target_trainable(ft(cfg, trainable_stages=["stem", -1]), stages, 5) == frozenset({0, 4})


@pytest.mark.parametrize("depth", [6, -1, "some"])
def test_invalid_freeze_depth_is_config_error(cfg, stages, depth):
    with pytest.raises(ConfigError, match="freeze_depth"):
        target_trainable(ft(cfg, freeze_depth=depth), stages, 5)


def test_trainable_stage_removed_by_truncation_is_config_error(cfg, stages):
    with pytest.raises(ConfigError, match="truncation removes"):
        target_trainable(ft(cfg, trainable_stages=["stage4"]), stages, 3)


# --- plan_phases --------------------------------------------------------------------------
def test_head_then_finetune(cfg):
    target = frozenset({1, 2, 3, 4})
    phases = plan_phases(ft(cfg, head_epochs=2, head_patience=3), 5, target)
    assert phases == [Phase("head", 2, frozenset(), 3), Phase("finetune", 3, target)]


def test_single_phase_without_warmup(cfg):
    target = frozenset(range(5))
    assert plan_phases(ft(cfg), 4, target) == [Phase("train", 4, target)]


def test_gradual_unfreezes_deepest_stage_first(cfg):
    target = frozenset(range(5))
    phases = plan_phases(ft(cfg, head_epochs=1, gradual=True, gradual_every=1), 10, target)
    assert [p.name for p in phases] == ["head", "unfreeze1", "unfreeze2", "unfreeze3", "unfreeze4", "finetune"]
    assert [p.trainable for p in phases] == [
        frozenset(),
        frozenset({4}),
        frozenset({3, 4}),
        frozenset({2, 3, 4}),
        frozenset({1, 2, 3, 4}),
        target,
    ]
    assert sum(p.epochs for p in phases) == 10
    assert phases[-1].epochs == 5


def test_gradual_stops_unfreezing_when_epochs_run_out(cfg):
    target = frozenset(range(5))
    phases = plan_phases(ft(cfg, head_epochs=1, gradual=True, gradual_every=2), 6, target)
    assert [(p.name, p.epochs) for p in phases] == [
        ("head", 1),
        ("unfreeze1", 2),
        ("unfreeze2", 2),
        ("finetune", 1),  # the full target always gets at least one epoch
    ]
    assert phases[-1].trainable == target


@pytest.mark.parametrize("head_epochs", [5, 7])
def test_head_epochs_filling_the_run_is_config_error(cfg, head_epochs):
    with pytest.raises(ConfigError, match="head_epochs"):
        plan_phases(ft(cfg, head_epochs=head_epochs), 5, frozenset({1}))


def test_linear_probe_is_one_phase_with_nothing_trainable(cfg, stages):
    probe = ft(cfg, freeze_depth="all", head_epochs=2)
    target = target_trainable(probe, stages, 5)
    assert plan_phases(probe, 5, target) == [Phase("train", 5, frozenset())]


def test_surgical_schedule_trains_only_the_chosen_stage(cfg, stages):
    surgical = ft(cfg, trainable_stages=["stage1"], head_epochs=1)
    target = target_trainable(surgical, stages, 5)
    phases = plan_phases(surgical, 3, target)
    assert [p.trainable for p in phases] == [frozenset(), frozenset({1})]


# --- learning rates -----------------------------------------------------------------------
def test_stage_lr_mults(cfg):
    assert stage_lr_mults(ft(cfg, backbone_lr_mult=0.1), 3) == pytest.approx([0.1, 0.1, 0.1])
    assert stage_lr_mults(ft(cfg, backbone_lr_mult=1.0, layer_decay=0.5), 4) == pytest.approx([0.125, 0.25, 0.5, 1.0])


@pytest.mark.parametrize(("field", "value"), [("layer_decay", 0.0), ("layer_decay", 1.5), ("backbone_lr_mult", -1)])
def test_invalid_lr_mult_is_config_error(cfg, field, value):
    with pytest.raises(ConfigError, match=field):
        stage_lr_mults(ft(cfg, **{field: value}), 3)


def test_lr_factor_warmup_then_cosine():
    assert [lr_factor(s, 12, 4, "cosine") for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, 12, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(8, 12, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(12, 12, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(20, 12, 4, "cosine") == pytest.approx(0.0)  # clamped past the end
    assert lr_factor(0, 10, 0, "cosine") == 1.0
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    values = [lr_factor(s, 10, 0, "cosine") for s in range(11)]
    assert values == sorted(values, reverse=True)


def test_lr_factor_constant():
    assert [lr_factor(s, 10, 2, "constant") for s in range(10)] == pytest.approx([0.5] + [1.0] * 9)


def test_lr_factor_unknown_schedule_is_config_error():
    with pytest.raises(ConfigError, match="schedule"):
        lr_factor(5, 10, 0, "linear")


# --- a real freeze-then-unfreeze run --------------------------------------------------------
class LrRecorder(pl.Callback):
    """LR of every group at each training step, as the optimizer will use it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def _loaders():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, SIZE, SIZE, generator=generator) * 2 + 1
    y = torch.arange(16) % 2
    train = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    val = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)
    return train, val


def test_head_phase_then_unfreeze_with_lightning(cfg):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    stages = map_stages(backbone)
    finetune = ft(cfg, head_epochs=1)
    optim = OmegaConf.merge(cfg.optim, {"schedule": "cosine", "warmup_epochs": 0})
    module = TransferModule(backbone, stages, 2, (3, SIZE, SIZE), finetune, optim)
    target = target_trainable(finetune, stages, module.kept)
    phases = plan_phases(finetune, 2, target)
    assert [p.name for p in phases] == ["head", "finetune"]
    train, val = _loaders()

    initial = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_initial = module.head[-1].weight.detach().clone()
    module.total_epochs = 2
    epoch, records = 0, []
    for phase in phases:  # the loop of train._fit_and_test
        module.set_trainable(phase.trainable)
        module.epoch_offset = epoch
        recorder = LrRecorder()
        trainer = pl.Trainer(
            max_epochs=phase.epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[recorder],
        )
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
        epoch += trainer.current_epoch
        records.append(recorder.steps)
        if phase.name == "head":
            for key, value in module.backbone.state_dict().items():
                assert torch.equal(value, initial[key]), f"{key} moved during the head phase"
            assert not torch.equal(module.head[-1].weight, head_initial)

    after = module.backbone.state_dict()
    assert not torch.equal(after["conv1.0.weight"], initial["conv1.0.weight"])
    assert not torch.equal(after["layer4.0.conv1.weight"], initial["layer4.0.conv1.weight"])
    assert not torch.equal(after["bn1.running_mean"], initial["bn1.running_mean"])
    assert after["bn1.num_batches_tracked"] == initial["bn1.num_batches_tracked"] + 4

    lr, mult = float(optim.lr) * float(finetune.head_lr_mult), float(finetune.backbone_lr_mult)
    steps_per_epoch, total = 4, 8
    head_phase, finetune_phase = records
    assert len(head_phase) == len(finetune_phase) == steps_per_epoch
    for step, lrs in enumerate(head_phase):
        assert all(lrs[name] == 0.0 for name in stages.names), lrs
        assert lrs["head"] == pytest.approx(lr * lr_factor(step, total, 0, "cosine"))
    for step, lrs in enumerate(finetune_phase):
        factor = lr_factor(steps_per_epoch + step, total, 0, "cosine")
        assert lrs["head"] == pytest.approx(lr * factor)
        assert all(lrs[name] == pytest.approx(lr * mult * factor) for name in stages.names)
    # Continuous across the switch: the finetune phase picks up where the head phase stopped.
    assert finetune_phase[0]["head"] < head_phase[-1]["head"]
    assert finetune_phase[0]["head"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_min_steps_raises_epochs_for_small_data(cfg):
    from transferlab.train import _epochs

    trainer = OmegaConf.merge(cfg.trainer, {"max_epochs": 6, "min_steps": 60})
    assert _epochs(trainer, steps_per_epoch=1) == 60  # 30 images, one batch: 60 epochs
    assert _epochs(trainer, steps_per_epoch=33) == 6  # large data: max_epochs already gives 198 steps
    assert _epochs(OmegaConf.merge(trainer, {"min_steps": 0}), steps_per_epoch=1) == 6


def test_small_data_scale_keeps_the_head_phase_share(cfg, stages):
    target = frozenset(range(5))
    phases = plan_phases(ft(cfg, head_epochs=2, gradual=True, gradual_every=1), 30, target, scale=5)
    assert [(p.name, p.epochs) for p in phases] == [
        ("head", 10),
        ("unfreeze1", 5),
        ("unfreeze2", 5),
        ("unfreeze3", 5),
        ("finetune", 5),
    ]
