import math

import pytest
import pytorch_lightning as pl
import timm
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from transferlab.errors import ConfigError
from transferlab.transfer.module import TransferModule
from transferlab.transfer.schedule import Phase, lr_factor, plan_phases, stage_lr_mults, target_trainable
from transferlab.transfer.stages import map_stages

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
    for phase in phases:  # the loop of jobs.fit.fit_phases
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
    # Fresh AdamW moments at the unfreeze (optim.at_unfreeze=reset), so the phase re-warms over
    # rewarm_epochs=0.5 of 4 steps: x0.5 on its first step, then the schedule as it stood.
    rewarm = [0.5, 1.0, 1.0, 1.0]
    for step, lrs in enumerate(finetune_phase):
        factor = lr_factor(steps_per_epoch + step, total, 0, "cosine") * rewarm[step]
        assert lrs["head"] == pytest.approx(lr * factor)
        assert lrs["head.no_decay"] == lrs["head"]
        assert all(lrs[name] == pytest.approx(lr * mult * factor) for name in stages.names)
    # The schedule resumes where the head phase stopped (times the re-warm-up).
    assert finetune_phase[1]["head"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 5 / 8)))


def test_min_steps_raises_epochs_for_small_data(cfg):
    from transferlab.jobs.fit import _epochs

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


# --- phase boundaries ------------------------------------------------------------------------
def _module(cfg, **optim):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    optim_cfg = OmegaConf.merge(cfg.optim, {"schedule": "constant", "warmup_epochs": 0, **optim})
    return TransferModule(backbone, map_stages(backbone), 2, (3, SIZE, SIZE), cfg.finetune, optim_cfg)


def _fit(module, epochs, callbacks):
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, *_loaders())
    return trainer


def test_best_weights_end_the_phase_and_select_last_keeps_the_final_ones(cfg):
    from transferlab.transfer.schedule import BestWeights

    for select in ("best", "last"):
        module = _module(cfg, lr=3.0)  # head LR 30: val loss jumps around, the last epoch is not the best
        module.set_trainable(frozenset())
        best = BestWeights(select)
        losses = []

        class Record(pl.Callback):
            def on_validation_end(self, trainer, pl_module):
                losses.append(float(trainer.callback_metrics["val/loss"]))

        _fit(module, 6, [Record(), best])
        assert best.best_loss == min(losses)
        assert losses.index(min(losses)) != len(losses) - 1, losses  # the setup really has a better earlier epoch
        x, y = _loaders()[1].dataset.tensors
        module.eval()
        with torch.no_grad():
            final = float(torch.nn.functional.cross_entropy(module(x), y))
        expected = min(losses) if select == "best" else losses[-1]
        assert final == pytest.approx(expected, rel=1e-5)


def test_warmup_scales_with_the_small_data_epoch_factor(cfg):
    module = _module(cfg, warmup_epochs=1)
    module.total_epochs, module.epoch_scale = 4, 2  # 2 epochs make one configured epoch
    recorder = LrRecorder()
    _fit(module, 4, [recorder])
    head = [step["head"] for step in recorder.steps]
    lr = float(module.head_lr)
    assert head[:9] == pytest.approx([lr * k / 8 for k in range(1, 9)] + [lr])  # 4 steps/epoch x 1 x 2


@pytest.mark.parametrize("at_unfreeze", ["reset", "carry"])
def test_optimizer_state_at_unfreeze(cfg, at_unfreeze):
    module = _module(cfg, at_unfreeze=at_unfreeze, rewarm_epochs=0.5)
    module.total_epochs = 2
    module.set_trainable(frozenset())
    _fit(module, 1, [])
    seen = {}

    class FirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                state = trainer.optimizers[0].state.get(pl_module.head[-1].weight, {})
                seen["step"] = float(state["step"]) if "step" in state else 0.0
                seen["lr"] = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}

    module.set_trainable(frozenset(range(5)))
    module.epoch_offset = 1
    _fit(module, 1, [FirstStep()])
    assert seen["step"] == (4.0 if at_unfreeze == "carry" else 0.0)  # 4 head steps' moments, or fresh
    rewarm = 0.5 if at_unfreeze == "reset" else 1.0  # re-warm-up over 2 of the 4 steps after a reset
    assert seen["lr"]["head"] == pytest.approx(module.head_lr * rewarm)


def test_each_phase_and_epoch_has_its_own_shuffle():
    from transferlab.data import InputSpec, TransferDataModule

    n = 32
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    splits = {s: (images, torch.arange(n) % 2) for s in ("train", "val", "test")}
    dm = TransferDataModule(splits, ["a", "b"], InputSpec(2, 1, (0.0,), (1.0,)), seed=0, batch_size=8)

    def order(offset: int, epoch: int) -> list[int]:
        dm.epoch_offset = offset  # the runner sets it before each phase's fit
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning calls at each epoch start
        return [int(v) for x, _ in loader for v in (x[:, 0, 0, 0] * 255).round()]

    head_phase, next_phase = order(0, 0), order(3, 0)  # epoch 0 of two phases
    assert sorted(head_phase) == sorted(next_phase) == list(range(n))
    assert head_phase != next_phase, "a later phase replays the first phase's shuffle"
    assert order(0, 1) != head_phase
    assert order(3, 0) == order(0, 3) == order(0, 3)  # a function of (seed, global epoch)
