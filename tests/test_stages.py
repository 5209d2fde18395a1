import copy
from functools import cache

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from transferlab.errors import ConfigError
from transferlab.transfer.module import TransferModule
from transferlab.transfer.schedule import target_trainable
from transferlab.transfer.stages import StageMap, map_stages, stage_names

# One tiny model per family, with the stage count timm's coarse grouping gives it.
FAMILIES = {
    "test_resnet": 5,
    "test_efficientnet": 6,
    "mobilenetv3_small_050": 8,
    "test_convnext": 6,
    "test_vit": 7,
    "regnetx_002": 5,
}
SIZE = 32

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")


@cache
def _pristine(name: str) -> tuple[nn.Module, StageMap]:
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return model, map_stages(model)


def backbone(name: str) -> tuple[nn.Module, StageMap]:
    model, stages = _pristine(name)
    return copy.deepcopy(model), stages


@pytest.mark.parametrize("name", FAMILIES)
def test_every_param_in_exactly_one_stage(name):
    model, stages = backbone(name)
    assert len(stages.names) == FAMILIES[name] >= 3
    assert stages.names == stage_names(len(stages.names))
    assert stages.names[0] == "stem"
    assert set(stages.param_stage) == {n for n, _ in model.named_parameters()}
    assert set(stages.param_stage.values()) == set(range(len(stages.names)))  # no empty stage
    per_stage = [stages.params_in(model, i) for i in range(len(stages.names))]
    assert sum(len(ps) for ps in per_stage) == len(list(model.parameters()))


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_follow_forward_order(name):
    model, stages = backbone(name)
    fired: list[int] = []
    for module_name, module in model.named_modules():
        if not list(module.children()):
            stage = stages.module_stage[module_name]
            module.register_forward_hook(lambda *_, s=stage: fired.append(s))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    assert fired[0] == 0
    assert fired[-1] == len(stages.names) - 1
    assert fired == sorted(fired), "a later stage ran before an earlier one"


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_outputs_belong_to_their_stage(name):
    model, stages = backbone(name)
    assert stages.feature_index, "every family exposes some feature outputs"
    for stage, feature in stages.feature_index.items():
        assert stages.module_stage[model.feature_info[feature]["module"]] == stage
    assert list(stages.feature_index.values()) == sorted(stages.feature_index.values())


@pytest.mark.parametrize(
    ("name", "depth"), [(name, depth) for name, count in FAMILIES.items() for depth in range(count + 1)]
)
def test_one_train_step_at_every_freeze_depth(cfg, name, depth):
    model, stages = backbone(name)
    ft = OmegaConf.merge(cfg.finetune, {"freeze_depth": depth})
    module = TransferModule(model, stages, 2, (3, SIZE, SIZE), ft, cfg.optim)
    target = target_trainable(ft, stages, module.kept)
    assert target == frozenset(range(depth, len(stages.names)))
    module.set_trainable(target)
    module.train()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module.param_groups())

    torch.manual_seed(1)
    loss = F.cross_entropy(module(torch.randn(2, 3, SIZE, SIZE)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    for param_name, param in module.backbone.named_parameters():
        stage = stages.param_stage[param_name]
        assert param.requires_grad == (stage in target)
        if stage not in target:
            assert param.grad is None
            assert torch.equal(param, before[f"backbone.{param_name}"])
    trained = {stages.param_stage[n] for n, p in module.backbone.named_parameters() if p.grad is not None}
    assert trained == target
    assert all(p.grad is not None for p in module.head.parameters())
    assert not torch.equal(module.head[-1].weight, before["head.0.weight"])


def test_model_without_group_matcher_is_config_error():
    with pytest.raises(ConfigError, match="group_matcher"):
        map_stages(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))


def test_index_resolves_names_ints_and_negatives():
    _, stages = backbone("test_resnet")
    assert stages.index("stem") == 0
    assert stages.index("stage3") == 3
    assert stages.index(2) == 2
    assert stages.index(-1) == 4
    assert stages.index("-1") == 4
    assert stages.index("4") == 4
    assert stages.index(-5) == 0


@pytest.mark.parametrize("ref", ["stage5", "layer1", 5, -6, "7", ""])
def test_index_rejects_unknown_stage(ref):
    _, stages = backbone("test_resnet")
    with pytest.raises(ConfigError, match="unknown stage"):
        stages.index(ref)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("frozen", ["all", "all_but_last"])
def test_frozen_stages_keep_every_param_and_buffer_bitwise(cfg, name, frozen):
    """Frozen means frozen on every family: timm's BatchNormAct2d (efficientnet, mobilenetv3,
    regnet) has child modules, and its running stats must not move either."""
    model, stages = backbone(name)
    depth = "all" if frozen == "all" else len(stages.names) - 1
    ft = OmegaConf.merge(cfg.finetune, {"freeze_depth": depth})
    module = TransferModule(model, stages, 2, (3, SIZE, SIZE), ft, cfg.optim)
    target = target_trainable(ft, stages, module.kept)
    module.set_trainable(target)
    initial = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = module.head[-1].weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        module.eval()
        module.train()  # Lightning toggles modes around validation: frozen modules must stay in eval
        x = torch.randn(4, 3, SIZE, SIZE, generator=generator) * 3 + 2  # off-centre: BN stats would move
        loss = F.cross_entropy(module(x), torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    params = dict(module.backbone.named_parameters())
    buffers = dict(module.backbone.named_buffers())
    checked = 0
    for key, value in module.backbone.state_dict().items():
        stage = stages.param_stage[key] if key in params else stages.module_stage[key.rsplit(".", 1)[0]]
        if stage not in target:
            assert torch.equal(value, initial[key]), f"frozen {'param' if key in params else 'buffer'} {key} moved"
            checked += key in buffers
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert checked > 0 or not has_bn, "no frozen BatchNorm buffer was checked"
    assert not torch.equal(module.head[-1].weight, head_before), "the head did not train"
    if target:  # the one trainable stage did train
        last = len(stages.names) - 1
        assert any(not torch.equal(p, initial[n]) for n, p in params.items() if stages.param_stage[n] == last)


@pytest.mark.parametrize("name", [*FAMILIES, "tf_efficientnet_lite0"])
def test_a_share_of_the_depth_cuts_at_a_feature_stage_no_deeper_than_that_share(name):
    _, stages = _pristine(name)
    if not stages.feature_index:
        pytest.skip(f"{name} has no feature outputs")
    last = len(stages.names) - 1
    for share in (25, 50, 75, 100):
        cut = stages.cut_point(f"{share}%") if min(stages.feature_index) <= share / 100 * last else None
        if cut is None:
            continue
        assert cut in stages.feature_index
        assert cut <= share / 100 * last
        deeper = [s for s in stages.feature_index if cut < s <= share / 100 * last]
        assert deeper == []  # the deepest one within the share


def test_seventy_five_percent_means_stage3_of_test_resnet_and_stage5_of_efficientnet_lite():
    assert _pristine("test_resnet")[1].names[_pristine("test_resnet")[1].cut_point("75%")] == "stage3"
    lite = _pristine("tf_efficientnet_lite0")[1]
    assert lite.names[lite.cut_point("75%")] == "stage5"
    with pytest.raises(ConfigError, match="share of the depth"):
        lite.cut_point("175%")
