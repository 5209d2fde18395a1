"""BitFit and LoRA: what trains, how many parameters LoRA adds, the merge, and honest FLOPs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from transferlab.data import InputSpec
from transferlab.transfer.compute import layer_costs, training_flops_per_sample
from transferlab.transfer.param_efficient import add_lora, build_bitfit, build_lora, merge_lora
from transferlab.transfer.stages import map_stages

SIZE = 32
SPEC = InputSpec(SIZE, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")


def _job(cfg, **finetune):
    job = copy.deepcopy(cfg)
    OmegaConf.set_struct(job, False)
    return OmegaConf.merge(job, {"finetune": finetune})


def _train(module, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    module.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, SIZE, SIZE, generator=generator) * 2 + 1
        loss = F.cross_entropy(module(x), torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_bitfit_trains_exactly_the_biases_and_norm_params(cfg, name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE} if "vit" in name else {}
    backbone = timm.create_model(name, num_classes=0, **kwargs)
    # In these models the vectors are exactly the biases and norm scales/shifts; every matrix,
    # kernel, token and position embedding is >= 2-D (checked independently of the route's rule).
    # (test_convnext's layer-scale `gamma` vectors are neither: they must stay frozen.)
    vectors = {n for n, p in backbone.named_parameters() if p.ndim == 1 and not n.endswith("gamma")}
    module, _ = build_bitfit(_job(cfg, strategy="bitfit"), backbone, SPEC, 2)
    module.set_trainable(frozenset(range(len(module.stages.names))))
    trained = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trained == vectors
    assert all(p.requires_grad for p in module.head.parameters())
    before = copy.deepcopy(module.backbone.state_dict())
    _train(module)
    for n, p in module.backbone.named_parameters():
        assert (p.grad is not None) == (n in vectors), n  # the chosen got gradients, the rest none
        if n not in vectors:
            assert torch.equal(p, before[n]), n
    assert not torch.equal(module.backbone.state_dict()[sorted(vectors)[-1]], before[sorted(vectors)[-1]])


def test_bitfit_respects_freeze_depth(cfg) -> None:
    torch.manual_seed(0)
    module, _ = build_bitfit(_job(cfg, strategy="bitfit"), timm.create_model("test_resnet", num_classes=0), SPEC, 2)
    module.set_trainable(frozenset({4}))  # stage4 only: its three BatchNorms (bn1, bn2, downsample.2)
    trained = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    names = ("bn1", "bn2", "downsample.2")
    assert trained == {f"layer4.0.{m}.{p}" for m in names for p in ("weight", "bias")}


# (in, out, kernel) of every conv in test_resnet, read off its definition.
TEST_RESNET_CONVS = [
    (3, 16, 3), (16, 16, 3), (16, 32, 3),  # stem
    (32, 32, 3), (32, 32, 3),  # layer1
    (32, 48, 3), (48, 48, 3), (32, 48, 1),  # layer2 (+ downsample)
    (48, 48, 1), (48, 48, 3), (48, 192, 1), (48, 192, 1),  # layer3 (bottleneck + downsample)
    (192, 96, 3), (96, 96, 3), (192, 96, 1),  # layer4
]  # fmt: skip


def test_lora_adds_rank_times_in_plus_out_per_layer_and_only_adapters_train(cfg) -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    plain = sum(p.numel() for p in backbone.parameters())
    job = _job(cfg, strategy="lora", lora={"rank": 2, "alpha": 4, "dropout": 0.0})
    module, tags = build_lora(job, backbone, SPEC, 2)
    added = sum(p.numel() for p in module.backbone.parameters()) - plain
    # Conv A: rank x in x k x k; conv B (1x1): out x rank. By hand, rank 2:
    # 86 + 320 + 352 + 640 + 640 + 672 + 960 + 160 + 192 + 960 + 480 + 480 + 3648 + 1920 + 576 = 12086
    assert sum(2 * i * k * k + o * 2 for i, o, k in TEST_RESNET_CONVS) == 12086  # the table agrees
    assert added == 12086
    assert tags["transferlab.lora.layers"] == "15"
    module.set_trainable(frozenset(range(len(module.stages.names))))
    trainable = sum(p.numel() for p in module.backbone.parameters() if p.requires_grad)
    assert trainable == 12086


def test_lora_on_a_vit_counts_linear_layers_by_hand() -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", num_classes=0, img_size=SIZE)
    plain = sum(p.numel() for p in backbone.parameters())
    add_lora(backbone, rank=2, alpha=4)
    # patch_embed conv 3->64, k16: 2*3*16*16 + 64*2 = 1664; per block (dim 64, mlp 192), 2 x (in + out):
    # qkv 2*(64+192)=512, proj 2*(64+64)=256, fc1 512, fc2 512 -> 1792; 6 blocks -> 10752. Total 12416.
    assert sum(p.numel() for p in backbone.parameters()) - plain == 12416
    assert len(map_stages(backbone).names) == len(map_stages(timm.create_model("test_vit", num_classes=0)).names)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
def test_lora_merges_back_into_a_plain_timm_model_with_the_same_outputs(cfg, name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE} if "vit" in name else {}
    backbone = timm.create_model(name, num_classes=0, **kwargs)
    job = _job(cfg, strategy="lora", lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    module, _ = build_lora(job, backbone, SPEC, 2)
    module.set_trainable(frozenset(range(len(module.stages.names))))
    _train(module)  # B is zero at init: train so the adapters change the output
    module.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        adapted = module(x)
        merge_lora(module.backbone)
        merged = module(x)
    assert torch.allclose(adapted, merged, atol=1e-4)
    fresh = timm.create_model(name, num_classes=0, **kwargs).eval()
    fresh.load_state_dict(module.backbone.state_dict())  # strict: same names and shapes as plain timm
    with torch.no_grad():
        assert torch.allclose(module.head(fresh(x)), adapted, atol=1e-4)
        assert not torch.allclose(module.head(timm.create_model(name, num_classes=0, **kwargs).eval()(x)), adapted)


def test_training_flops_charge_input_grads_through_frozen_weights_not_weight_grads() -> None:
    # Two Linear layers, F1 = 2*8*16 = 256 and F2 = 2*16*4 = 128 FLOPs per sample.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    costs = layer_costs(model, torch.zeros(1, 8))
    assert training_flops_per_sample(model, costs) == 3 * 256 + 3 * 128 - 256  # full: first layer needs no input grad
    for layer in (model[0], model[2]):  # BitFit: biases only
        layer.weight.requires_grad_(False)
    # Layer 1: forward only (its bias grad is a sum) = 256; layer 2: forward + input grad = 2 * 128.
    assert training_flops_per_sample(model, costs) == 256 + 256
    lora = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    add_lora(lora, rank=2, alpha=2)
    for n, p in lora.named_parameters():
        p.requires_grad_(".lora_" in n)
    # base1 256 (x1) | A1 8->2: 32 (x2) | B1 2->16: 64 (x3) | base2 128 (x2) | A2 16->2: 64 (x3) | B2 2->4: 16 (x3)
    expected = 256 + 64 + 192 + 256 + 192 + 48
    assert training_flops_per_sample(lora, layer_costs(lora, torch.zeros(1, 8))) == expected


@pytest.mark.slow
def test_bitfit_and_lora_jobs_log_what_trains_and_cost_less_than_fine_tuning(store: str) -> None:
    import mlflow
    from safetensors.torch import load_file

    from conftest import FAST
    from transferlab.config import compose_config
    from transferlab.jobs.run import run

    full = run(compose_config([*FAST, "study=peft"]))
    bitfit = run(compose_config([*FAST, "study=peft", "finetune.strategy=bitfit"]))
    lora = run(compose_config([*FAST, "study=peft", "finetune=lora", "finetune.lora.rank=2"]))
    head = 96 * 10 + 10  # test_resnet's 96 pooled features (layer4) -> 10 digit classes
    assert lora["compute/trainable_params"] == 12086 + head  # the hand count above, plus the head
    vectors = sum(p.numel() for p in timm.create_model("test_resnet", num_classes=0).parameters() if p.ndim == 1)
    assert bitfit["compute/trainable_params"] == vectors + head
    for cheap in (bitfit, lora):
        assert cheap["compute/train_flops_per_sample"] < full["compute/train_flops_per_sample"]
        assert cheap["compute/train_flops_per_sample"] > full["compute/inference_flops_per_sample"]  # not free
    client = mlflow.MlflowClient(store)
    (logged,) = client.search_runs(
        [client.get_experiment_by_name("peft").experiment_id], "params.`finetune.strategy` = 'lora'"
    )
    state = load_file(client.download_artifacts(logged.info.run_id, "model/model.safetensors"))
    plain = timm.create_model("test_resnet", num_classes=0)
    plain.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})  # merged: plain timm
