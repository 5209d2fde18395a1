import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from transferlab.errors import ConfigError
from transferlab.transfer.module import TransferModule, build_head
from transferlab.transfer.schedule import target_trainable
from transferlab.transfer.stages import map_stages

SIZE = 32

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")


@pytest.fixture(scope="module")
def pristine():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=0)


def make(cfg, pristine, **finetune) -> TransferModule:
    backbone = copy.deepcopy(pristine)
    ft = OmegaConf.merge(cfg.finetune, finetune)
    return TransferModule(backbone, map_stages(backbone), 2, (3, SIZE, SIZE), ft, cfg.optim)


def train_steps(module: TransferModule, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    module.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, SIZE, SIZE, generator=generator) * 2 + 1  # off-centre: BN stats must move
        loss = F.cross_entropy(module(x), torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_building_the_module_leaves_backbone_state_untouched(cfg, pristine):
    module = make(cfg, pristine)
    for name, value in pristine.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[name], value), name


def test_frozen_stages_keep_params_and_bn_buffers_bitwise(cfg, pristine):
    module = make(cfg, pristine, freeze_depth=2)
    stages = module.stages
    target = target_trainable(OmegaConf.merge(cfg.finetune, {"freeze_depth": 2}), stages, module.kept)
    assert target == frozenset({2, 3, 4})
    module.set_trainable(target)
    initial = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(module.param_groups())
    train_steps(module, optimizer)

    state = module.backbone.state_dict()
    params = dict(module.backbone.named_parameters())
    stage_of = stages.module_stage
    checked = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}
    for key, value in state.items():
        owner = key.rsplit(".", 1)[0]
        stage = stages.param_stage.get(key, stage_of[owner])
        checked[stage] += 1
        if stage < 2:
            assert torch.equal(value, initial[key]), f"frozen {key} moved"
    assert checked[0]
    assert checked[1]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert not torch.equal(state[f"layer3.0.bn1.{key}"], initial[f"layer3.0.bn1.{key}"])
        assert torch.equal(state[f"layer1.0.bn1.{key}"], initial[f"layer1.0.bn1.{key}"])
    for stage in (2, 3, 4):
        assert any(not torch.equal(p, initial[n]) for n, p in params.items() if stages.param_stage[n] == stage), (
            f"stage {stage} did not train"
        )
    for name, param in params.items():
        frozen = stages.param_stage[name] < 2
        assert param.requires_grad is not frozen
        if frozen:
            assert param.grad is None
            assert param not in optimizer.state, f"optimizer keeps state for frozen {name}"
        else:
            assert param in optimizer.state


def test_frozen_modules_stay_in_eval_across_train_calls(cfg, pristine):
    module = make(cfg, pristine)
    module.set_trainable(frozenset({3, 4}))
    module.train()
    module.eval()
    module.train()
    assert not module.backbone.bn1.training
    assert not module.backbone.layer2[0].bn2.training
    assert module.backbone.layer3[0].bn1.training
    assert module.head.training
    module.set_trainable(frozenset(range(5)))
    assert module.backbone.bn1.training, "unfreezing must return the stem to train mode"


def test_truncation_keeps_stages_up_to_the_cut(cfg, pristine):
    module = make(cfg, pristine, truncate_after="stage2")
    channels = [info["num_chs"] for info in pristine.feature_info]
    assert module.kept == 3
    assert module.head[-1].in_features == channels[2] == 48
    assert module.features(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 48)
    names = [n for n, _ in module.backbone.named_parameters()]
    assert names
    assert not [n for n in names if n.startswith(("layer3", "layer4"))]
    assert {module.stages.param_stage[n] for n in names} == {0, 1, 2}
    names = [g["name"] for g in module.param_groups() if "weight_decay" not in g]
    assert names == ["stem", "stage1", "stage2", "head"]

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module.param_groups())
    train_steps(module, optimizer, steps=1)
    assert not torch.equal(module.backbone.layer2[0].conv1.weight, before["backbone.layer2.0.conv1.weight"])


def test_truncating_at_a_stage_without_feature_output_is_config_error(cfg):
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    stages = map_stages(backbone)
    assert 0 not in stages.feature_index
    ft = OmegaConf.merge(cfg.finetune, {"truncate_after": "stem"})
    with pytest.raises(ConfigError, match="no feature output"):
        TransferModule(backbone, stages, 2, (3, SIZE, SIZE), ft, cfg.optim)


def test_truncate_after_unknown_stage_is_config_error(cfg, pristine):
    with pytest.raises(ConfigError, match="unknown stage"):
        make(cfg, pristine, truncate_after="stage9")


def test_head_hidden_layers_and_dropout(cfg):
    head_cfg = OmegaConf.create({"hidden": [64, 32], "dropout": 0.25})
    head = build_head(96, head_cfg, 5)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(96, 64), (64, 32), (32, 5)]
    dropouts = [m for m in head if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.25, 0.25]
    assert isinstance(head[1], nn.ReLU)

    plain = build_head(96, OmegaConf.create({"hidden": [], "dropout": 0.5}), 5)
    assert isinstance(plain[0], nn.Dropout)
    assert plain[0].p == 0.5
    assert (plain[1].in_features, plain[1].out_features) == (96, 5)
    assert len(build_head(96, OmegaConf.create({"hidden": [], "dropout": 0.0}), 5)) == 1


def test_head_is_fresh_and_seeded(cfg, pristine):
    torch.manual_seed(1)
    first = make(cfg, pristine, head={"hidden": [16], "dropout": 0.1})
    torch.manual_seed(2)
    second = make(cfg, pristine, head={"hidden": [16], "dropout": 0.1})
    torch.manual_seed(1)
    again = make(cfg, pristine, head={"hidden": [16], "dropout": 0.1})
    assert first.head[0].weight.shape == (16, 96)
    assert first.head[-1].weight.shape == (2, 16)
    assert not torch.equal(first.head[0].weight, second.head[0].weight)
    assert torch.equal(first.head[0].weight, again.head[0].weight)
    # The backbone comes from the checkpoint untouched; only the head is new.
    for name, value in pristine.state_dict().items():
        assert torch.equal(first.backbone.state_dict()[name], value)


def test_param_groups_names_and_lrs(cfg, pristine):
    module = make(cfg, pristine)
    groups = [g for g in module.param_groups() if "weight_decay" not in g]  # decayed halves
    lr, mult = float(cfg.optim.lr) * float(cfg.finetune.head_lr_mult), float(cfg.finetune.backbone_lr_mult)
    assert [g["name"] for g in groups] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert groups[-1]["lr"] == lr
    assert [g["lr"] for g in groups[:-1]] == pytest.approx([lr * mult] * 5)
    grouped = [id(p) for g in module.param_groups() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters())  # each param exactly once


def test_layer_decay_lowers_lr_toward_the_stem(cfg, pristine):
    module = make(cfg, pristine, layer_decay=0.5, backbone_lr_mult=1.0)
    lrs = [g["lr"] for g in module.param_groups() if "weight_decay" not in g]
    lr = float(cfg.optim.lr) * float(cfg.finetune.head_lr_mult)
    assert lrs == pytest.approx([lr / 16, lr / 8, lr / 4, lr / 2, lr, lr])
    assert min(lrs) == lrs[0]


def test_head_lr_follows_optim_lr(cfg, pristine):
    module = make(cfg, pristine, head_lr_mult=1.0)
    assert module.param_groups()[-1]["lr"] == float(cfg.optim.lr)


def test_accuracy_is_plain_not_balanced(cfg, pristine):
    module = make(cfg, pristine)
    classes = module.head[-1].out_features
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 1]), classes).float()
    module.test_acc(logits, torch.tensor([0, 0, 0, 0, 2]))
    assert module.test_acc.compute().item() == pytest.approx(0.8)  # macro averaging would say 0.33


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
def test_no_weight_decay_on_norm_bias_and_tokens(cfg, name):
    """timm's convention (optim.param_groups_weight_decay): norm and bias parameters, and the
    model's no_weight_decay() set (ViT pos_embed, cls_token), are never decayed."""
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE} if "vit" in name else {}
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    module = TransferModule(backbone, map_stages(backbone), 2, (3, SIZE, SIZE), cfg.finetune, cfg.optim)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module.param_groups(), weight_decay=0.5)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay moves anything
    optimizer.step()
    norm_types = (nn.BatchNorm2d, nn.LayerNorm)
    norms = {f"backbone.{n}" for n, m in module.backbone.named_modules() if isinstance(m, norm_types)}
    tokens = {f"backbone.{t}" for t in getattr(backbone, "no_weight_decay", set)()}
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    for n, p in module.named_parameters():
        exempt = n.endswith(".bias") or n.rsplit(".", 1)[0] in norms or n in tokens
        assert (n in moved) is not exempt, f"{n}: {'decayed' if n in moved else 'not decayed'}"
    assert moved, "no weight decayed at all"
