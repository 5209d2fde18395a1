import pytest
import pytorch_lightning as pl
import timm
import torch
from torch import nn

from transferlab.transfer.compute import (
    FitTimer,
    forward_flops,
    layer_costs,
    peak_memory_mb,
    trainable_params,
    training_flops_per_sample,
)


@pytest.fixture(scope="module")
def resnet18_64():
    model = timm.create_model("resnet18", pretrained=False)
    return model, layer_costs(model, torch.randn(2, 3, 64, 64))


def _freeze_prefixes(model: nn.Module, prefixes: list[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f"{pre}.") for pre in prefixes))


def test_resnet18_forward_flops_match_timm_table():
    model = timm.create_model("resnet18", pretrained=False)
    costs = layer_costs(model, torch.randn(2, 3, 224, 224))
    # timm quotes 1.81-1.82 GMACs; FlopCounterMode counts 2 FLOPs per MAC.
    assert forward_flops(costs) == pytest.approx(3.64e9, rel=0.01)
    assert costs[0].name == "conv1"
    assert costs[-1].name == "fc"


def test_full_finetune_is_about_three_forwards(resnet18_64):
    model, costs = resnet18_64
    _freeze_prefixes(model, [])
    ratio = training_flops_per_sample(model, costs) / forward_flops(costs)
    # Not exactly 3: the first conv needs no input gradient.
    assert 2.85 < ratio < 3.0


def test_training_flops_fall_as_stages_freeze(resnet18_64):
    model, costs = resnet18_64
    fwd = forward_flops(costs)
    stages = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    ratios = []
    for depth in [2, 3, 4, 5, 6]:
        _freeze_prefixes(model, stages[:depth])
        ratios.append(training_flops_per_sample(model, costs) / fwd)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert 1.0 < ratios[-1] <= 1.01


def test_trainable_norm_below_frozen_convs_needs_input_grads(resnet18_64):
    model, costs = resnet18_64
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("bn1."))
    conv1 = next(c.flops for c in costs if c.name == "conv1")
    expected = 2 * forward_flops(costs) - conv1
    assert training_flops_per_sample(model, costs) == pytest.approx(expected)
    assert trainable_params(model) == 2 * 64


def test_vit_counts_attention_matmuls():
    model = timm.create_model("test_vit", img_size=64)
    example = torch.randn(2, 3, 64, 64)
    shapes = {}

    def record(module, args, out):
        shapes[module] = out.shape

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    dense = 0
    for m, out in shapes.items():
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()
        dense += 2 * fan_in * out.numel() // example.shape[0]
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    attention = len(model.blocks) * 2 * (2 * tokens * tokens * model.embed_dim)  # QK^T and AV

    costs = layer_costs(model, example)

    assert forward_flops(costs) == pytest.approx(dense + attention)
    assert all(b.attn.fused_attn for b in model.blocks)  # restored


def test_depthwise_conv_trains_at_three_forwards():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
    )
    costs = layer_costs(model, torch.randn(4, 3, 16, 16))
    assert [c.name for c in costs] == ["0", "1", "3"]
    assert costs[1].flops == 2 * 32 * 9 * 16 * 16
    expected = 3 * forward_flops(costs) - costs[0].flops  # first layer: no input grad
    assert training_flops_per_sample(model, costs) == pytest.approx(expected)


def test_layer_costs_leaves_modes_and_requires_grad():
    model = timm.create_model("test_resnet")
    model.train()
    model.layer1.eval()
    model.conv1.requires_grad_(False)
    before = [(n, m.training) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]

    layer_costs(model, torch.randn(2, 3, 32, 32))

    assert [(n, m.training) for n, m in model.named_modules()] == before
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_timer_accumulates_samples_over_fits():
    data = torch.utils.data.TensorDataset(torch.randn(20, 8), torch.randint(0, 2, (20,)))
    timer = FitTimer()
    for fit in range(2):
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(_Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
        if fit == 0:
            assert timer.samples == 40
            first = timer.seconds
    assert timer.samples == 80
    assert timer.seconds > first > 0
    assert timer.samples_per_second == pytest.approx(80 / timer.seconds)


def test_peak_memory_reports_rss():
    mem = peak_memory_mb()
    assert 10 < mem["rss_peak_mb"] < 1e6
    assert mem["cuda_peak_mb"] >= 0


def test_peak_memory_is_per_job_after_a_reset():
    """A sweep runs many jobs in one process: each must report its own peak, not the maximum so far."""
    import numpy as np

    from transferlab.transfer.compute import reset_peak_memory

    big = np.ones(300 * 2**20 // 8)  # 300 MiB touched
    before = peak_memory_mb()["rss_peak_mb"]
    del big
    assert reset_peak_memory(), "VmHWM reset via /proc/self/clear_refs is not available here"
    small = np.ones(20 * 2**20 // 8)
    after = peak_memory_mb()["rss_peak_mb"]
    assert small.sum() > 0
    assert after < before - 200, (before, after)
