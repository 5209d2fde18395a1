"""Extra input channels end to end: `data.channels=4` keeps RGBA PNGs (or a .npy stack) as four
channels, the backbone's in_chans follows, and pretrained first convs are adapted by timm's rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from transferlab.config import compose_config, validate
from transferlab.data import build_datamodule, check_data
from transferlab.data.transforms import BatchTransform, InputSpec
from transferlab.errors import ConfigError, DataError
from transferlab.jobs.upstream import source_config
from transferlab.schema import check_fields
from transferlab.tracking.identity import config_hash
from transferlab.transfer import imagenet
from transferlab.transfer.backbone import apply_state, create_backbone, input_spec

RGBA16 = InputSpec(size=16, in_chans=4, mean=(0.0,) * 4, std=(1.0,) * 4)


def rgba_folder(root: Path, per_class: int = 6, size: int = 20, rgb_only: set[str] = frozenset()) -> Path:
    """Two classes that differ only in alpha (left or right half opaque); `rgb_only` names files
    saved without alpha."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["left", "right"]):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
            pixels[..., 3] = 0
            pixels[:, : size // 2, 3] = 255 if c == 0 else 0
            pixels[:, size // 2 :, 3] = 0 if c == 0 else 255
            name = f"{cls}/{i}.png"
            image = Image.fromarray(pixels, "RGBA")
            (image.convert("RGB") if name in rgb_only else image).save(root / name)
    return root


def data_cfg(root: Path, **overrides):
    return compose_config(["data=imagefolder", f"data.root={root}", "data.channels=4", *overrides]).data


def saved_weights(name: str, path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-channel model's weights (non-trivial, seeded) as safetensors."""
    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def backbone_cfg(name: str, weights: str, channels: int = 4, *extra: str):
    cfg = compose_config([f"backbone.name={name}", f"backbone.weights={weights}", f"data.channels={channels}", *extra])
    return cfg.backbone


# --- the first conv, by timm's rule ------------------------------------------------------------


FIRST_CONVS = [  # one per family: resnet, mobilenetv3, convnext, regnet, vit (lite0: the wheel test below)
    ("test_resnet", "conv1.0"),
    ("mobilenetv3_small_050", "conv_stem"),
    ("test_convnext", "stem.0"),
    ("regnetx_002", "stem.conv"),
    ("test_vit", "patch_embed.proj"),
]


@pytest.mark.parametrize(("name", "conv"), FIRST_CONVS)
def test_four_channel_first_conv_repeats_the_rgb_filters_scaled_by_three_quarters(tmp_path, name, conv):
    path, state = saved_weights(name, tmp_path / "w.safetensors")
    # at the model's own input size: a ViT at another size also resamples its position embedding
    model = create_backbone(backbone_cfg(name, str(path), 4, "backbone.input_size=null")).model
    rgb = state[f"{conv}.weight"]
    expected = torch.cat([rgb, rgb[:, :1]], dim=1) * 0.75  # channels R, G, B, R, each x 3/4
    assert torch.allclose(model.get_submodule(conv).weight, expected)
    others = {k: v for k, v in model.state_dict().items() if k != f"{conv}.weight"}
    assert all(torch.equal(v, state[k]) for k, v in others.items())  # nothing else changed


FAMILIES = ["test_resnet", "resnet10t", "mobilenetv3_small_050", "test_convnext", "regnetx_002", "test_vit"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_fourth_channel_changes_the_output(tmp_path, name):
    path, _ = saved_weights(name, tmp_path / "w.safetensors")
    model = create_backbone(backbone_cfg(name, str(path))).model.eval()
    x = torch.rand(2, 4, 32, 32)
    other = x.clone()
    other[:, 3] = 1 - other[:, 3]
    with torch.no_grad():
        assert model(x).shape[0] == 2
        assert not torch.allclose(model(x), model(other), atol=1e-5)
        third = x.clone()
        third[:, 3] = 0
        assert not torch.allclose(model(x), model(third), atol=1e-5)


def test_imagenet_wheel_stem_adapted_to_four_channels(tmp_path):
    cache_dir = tmp_path / "cache"
    overrides = ["backbone=efficientnet_lite0", "backbone.input_size=32"]
    rgb = create_backbone(compose_config(overrides).backbone, cache_dir=cache_dir)
    four = create_backbone(compose_config([*overrides, "data.channels=4"]).backbone, cache_dir=cache_dir)
    source = imagenet.load_source(
        imagenet.wheel_file("tf_efficientnet_lite0"), imagenet.WHEELS["tf_efficientnet_lite0"]
    )
    stem = source["_conv_stem.weight"]  # the wheel's own tensor, not the converted cache
    assert torch.equal(rgb.model.conv_stem.weight, stem)
    expected = torch.cat([stem, stem[:, :1]], dim=1) * 0.75
    assert torch.allclose(four.model.conv_stem.weight, expected)
    assert four.tags["imagenet.sha256"] == rgb.tags["imagenet.sha256"]
    spec = input_spec(four.model, compose_config([*overrides, "data.channels=4"]).backbone)
    assert (spec.in_chans, spec.size, spec.mean, spec.std) == (4, 32, (0.5,) * 4, (0.5,) * 4)
    x = torch.rand(1, 4, 32, 32)
    other = x.clone()
    other[:, 3] = 1 - other[:, 3]
    with torch.no_grad():
        assert not torch.allclose(four.model.eval()(x), four.model(other), atol=1e-5)


def test_extra_channel_statistics_are_the_mean_of_the_rgb_ones():
    cfg = compose_config(["backbone.name=resnet10t", "backbone.input_size=32", "data.channels=4"]).backbone
    spec = input_spec(timm.create_model("resnet10t", num_classes=0, in_chans=4), cfg)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert spec.mean == pytest.approx((*mean, sum(mean) / 3))
    assert spec.std == pytest.approx((*std, sum(std) / 3))


def test_extra_channel_statistics_can_be_set_by_the_data_and_leave_rgb_alone(tmp_path):
    root = rgba_folder(tmp_path / "rgba", size=16)  # alpha is 0 or 255, nothing in between
    batches = {}
    for name, extra in [("default", []), ("set", ["data.extra_mean=[0.25]", "data.extra_std=[0.5]"])]:
        cfg = compose_config(
            ["backbone.name=resnet10t", "backbone.input_size=16", "data.crop_pct=1.0", "data.augment=none"]
            + ["data=imagefolder", f"data.root={root}", "data.channels=4", *extra]
        )
        spec = input_spec(timm.create_model("resnet10t", num_classes=0, in_chans=4), cfg.backbone, cfg.data)
        batches[name], _ = next(iter(build_datamodule(cfg.data, spec, seed=0).val_dataloader()))
    assert sorted(batches["set"][:, 3].unique().tolist()) == [-0.5, 1.5]  # (0 - 0.25) / 0.5, (1 - 0.25) / 0.5
    mean, std = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3  # the default: RGB averages
    assert batches["default"][:, 3].unique().tolist() == pytest.approx([-mean / std, (1 - mean) / std])
    assert torch.equal(batches["set"][:, :3], batches["default"][:, :3])


def test_a_first_conv_that_cannot_be_adapted_is_one_line(tmp_path):
    model = timm.create_model("test_resnet", num_classes=0, in_chans=4)
    state = {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}
    state["conv1.0.weight"] = state["conv1.0.weight"].flatten(1)  # a Linear-like 2-D stem
    with pytest.raises(ConfigError, match=r"first conv conv1\.0\.weight in w\.pth .* cannot be adapted"):
        apply_state(model, state, "w.pth")
    state["conv1.0.weight"] = torch.zeros(24, 3, 5, 5)  # another kernel size: another architecture
    with pytest.raises(ConfigError, match="weights in w.pth do not fit") as err:
        apply_state(model, state, "w.pth")
    assert "\n" not in str(err.value)


# --- data: RGBA image folders and .npy stacks --------------------------------------------------


def test_rgba_folder_is_kept_as_four_channels_with_alpha(tmp_path):
    root = rgba_folder(tmp_path / "rgba", size=16)
    cfg = OmegaConf.merge(data_cfg(root), {"crop_pct": 1.0, "val_fraction": 0.0, "test_fraction": 0.0})
    dm = build_datamodule(cfg, RGBA16, seed=0)
    images, labels = dm.splits["train"]
    assert images.shape[1:] == (4, 16, 16)
    left = images[labels == dm.class_names.index("left")]
    assert (left[:, 3, :, :8] == 255).all()
    assert (left[:, 3, :, 8:] == 0).all()
    source = np.asarray(Image.open(root / "left" / "0.png"))
    assert any(np.array_equal(img.numpy().transpose(1, 2, 0), source) for img in left)
    rgb = InputSpec(size=16, in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    default = build_datamodule(OmegaConf.merge(cfg, {"channels": 3}), rgb, seed=0)
    assert default.splits["train"][0].shape[1] == 3  # as before: RGBA converted to RGB


@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_every_augmentation_keeps_four_channels(augment):
    batch = torch.randint(0, 256, (6, 4, 20, 20), dtype=torch.uint8)
    spec = InputSpec(size=16, in_chans=4, mean=(0.5,) * 4, std=(0.25,) * 4)
    x, _ = BatchTransform(spec, augment)((batch, torch.zeros(6)))
    assert x.shape == (6, 4, 16, 16)
    assert torch.isfinite(x).all()
    if augment == "none":  # the centre crop, normalised per channel, alpha included
        assert torch.allclose(x, (batch[:, :, 2:18, 2:18].float() / 255 - 0.5) / 0.25)


def test_rgb_images_among_rgba_ones_fail_with_the_file_named(tmp_path):
    root = rgba_folder(tmp_path / "mixed", rgb_only={"right/3.png"})
    with pytest.raises(DataError, match=r"right/3\.png has no alpha channel \(mode RGB\) but data\.channels=4"):
        build_datamodule(data_cfg(root), RGBA16, seed=0)
    with pytest.raises(DataError, match="no alpha channel"):  # also with data.skip_corrupt: not unreadable
        check_data(OmegaConf.merge(data_cfg(root), {"skip_corrupt": True}), RGBA16, 0, tmp_path / "cache")


def test_an_rgb_folder_with_four_channels_asked_fails(tmp_path):
    names = {f"{c}/{i}.png" for c in ("left", "right") for i in range(6)}
    root = rgba_folder(tmp_path / "rgb", rgb_only=names)
    with pytest.raises(DataError, match="has no alpha channel .* save every image as RGBA, or set data.channels=3"):
        check_data(data_cfg(root), RGBA16, 0, tmp_path / "cache")


def test_channel_counts_image_files_cannot_hold_are_refused(tmp_path):
    root = rgba_folder(tmp_path / "f")
    with pytest.raises(ConfigError, match="data.channels=5 with data.source=imagefolder: .* use data=npy"):
        validate(compose_config(["data=imagefolder", f"data.root={root}", "data.channels=5"]))
    with pytest.raises(ConfigError, match=r"data\.channels=0 is invalid"):
        check_fields(compose_config(["data.channels=0"]))


def test_a_backbone_override_that_disagrees_with_the_data_fails(tmp_path):
    root = rgba_folder(tmp_path / "f")
    cfg = compose_config(["data=imagefolder", f"data.root={root}", "data.channels=4", "backbone.in_chans=3"])
    spec = InputSpec(size=16, in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    with pytest.raises(
        ConfigError, match=r"data has 4 channel.*backbone\.in_chans=3: set backbone\.in_chans=4 or drop that override"
    ):
        build_datamodule(cfg.data, spec, seed=0)


def test_a_bundled_source_with_four_channels_asked_fails():
    cfg = compose_config(["data=digits", "data.channels=4"]).data
    with pytest.raises(DataError, match="data.source=digits has 1 channel.* data.channels=4: set data.channels=3"):
        build_datamodule(cfg, RGBA16, seed=0)


def save_stack(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    return root


def npy_cfg(root: Path, channels: int = 4):
    return compose_config(["data=npy", f"data.root={root}", f"data.channels={channels}"]).data


def test_npy_stack_channels_first_or_last_stores_the_same_images(tmp_path):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (20, 4, 16, 24), dtype=np.uint8)  # not square: centre square kept
    labels = np.array(["rock", "water"] * 10)
    first = build_datamodule(npy_cfg(save_stack(tmp_path / "nchw", nchw, labels)), RGBA16, seed=0)
    last = build_datamodule(npy_cfg(save_stack(tmp_path / "nhwc", nchw.transpose(0, 2, 3, 1), labels)), RGBA16, 0)
    assert first.class_names == ["rock", "water"]
    for split in ("train", "val", "test"):
        assert torch.equal(first.splits[split][0], last.splits[split][0])
        assert torch.equal(first.splits[split][1], last.splits[split][1])
    assert first.splits["train"][0].shape[1:] == (4, 16, 16)
    all_rows = torch.cat([first.splits[s][0] for s in ("train", "val", "test")])
    assert {img.numpy().tobytes() for img in all_rows} == {img[:, :, 4:20].tobytes() for img in nchw}


def test_npy_stack_goes_through_the_store(tmp_path):
    rng = np.random.default_rng(2)
    root = save_stack(tmp_path / "s", rng.integers(0, 256, (12, 16, 16, 5), dtype=np.uint8), np.arange(12) % 3)
    spec = InputSpec(size=16, in_chans=5, mean=(0.0,) * 5, std=(1.0,) * 5)
    names, sizes = check_data(npy_cfg(root, 5), spec, 0, tmp_path / "cache")
    assert names == ["0", "1", "2"]
    assert sum(sizes.values()) == 12
    dm = build_datamodule(npy_cfg(root, 5), spec, 0, cache_dir=tmp_path / "cache")
    assert dm.splits["train"][0].shape[1] == 5


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((4, 4, 8, 8), np.float32), np.arange(4), "holds float32, not uint8"),
        (np.zeros((4, 3, 8, 8), np.uint8), np.arange(4), r"shape \(4, 3, 8, 8\), not N x 4 x H x W"),
        (np.zeros((4, 4, 8, 8), np.uint8), np.arange(3), r"save one label per image, shape \(4,\)"),
        (np.zeros((4, 4, 8, 8), np.uint8), np.array([{}, {}, {}, {}], dtype=object), "not a plain .npy array"),
    ],
)
def test_bad_npy_stacks_fail_with_one_line(tmp_path, images, labels, match):
    root = tmp_path / "bad"
    root.mkdir()
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels, allow_pickle=True)
    with pytest.raises(DataError, match=match) as err:
        build_datamodule(npy_cfg(root), RGBA16, seed=0)
    assert "\n" not in str(err.value)


def test_npy_stack_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"images\.npy is missing"):
        build_datamodule(npy_cfg(tmp_path / "empty"), RGBA16, seed=0)


# --- config: in_chans follows the data; hashes and source models -------------------------------


def test_in_chans_follows_data_channels_and_three_keeps_old_hashes():
    assert compose_config(["data.channels=4"]).backbone.in_chans == 4
    default = compose_config([])
    assert default.backbone.in_chans == 3
    without = OmegaConf.to_container(default, resolve=True)
    for field in ("channels", "extra_mean", "extra_std"):  # fields added after runs were stored
        del without["data"][field]
    assert config_hash(OmegaConf.create(without)) == config_hash(default)  # stored runs keep their hash
    four = compose_config(["data.channels=4"])
    assert config_hash(compose_config(["data.channels=4", "data.extra_mean=[0.4]"])) != config_hash(four)


def test_a_source_model_for_four_channels_trains_on_its_own_data_channels():
    cfg = compose_config(["data=imagefolder", "data.root=/x", "data.channels=4", "backbone.weights=source"])
    src = source_config(cfg)
    assert (src.backbone.in_chans, src.data.channels) == (3, 3)  # its first conv is adapted when loaded
    assert source_config(compose_config(["backbone.weights=source", "backbone.in_chans=1"])).backbone.in_chans == 1


@pytest.mark.slow
def test_a_four_channel_folder_trains_end_to_end(store, tmp_path, native_cpu_kernels):
    from transferlab.jobs.run import run

    root = rgba_folder(tmp_path / "rgba", per_class=12, size=24)
    path, _ = saved_weights("test_resnet", tmp_path / "rgb.safetensors")
    cfg = compose_config(
        [
            "data=imagefolder",
            f"data.root={root}",
            "data.channels=4",
            "data.augment=light",
            f"backbone.weights={path}",
            "finetune=head_then_all",
            "finetune.head_epochs=1",
            "trainer.max_epochs=2",
            "trainer.min_steps=0",
            "trainer.accelerator=cpu",
            "study=channels",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    metrics = run(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    import mlflow

    logged = mlflow.search_runs(experiment_names=[str(cfg.study)], output_format="list")[0].data.params
    assert (logged["data.channels"], logged["backbone.in_chans"]) == ("4", "4")


def test_the_cli_refuses_an_rgb_folder_asked_for_four_channels_before_any_job(tmp_path, store, capsys):
    from transferlab.cli import main

    names = {f"{c}/{i}.png" for c in ("left", "right") for i in range(6)}
    root = rgba_folder(tmp_path / "rgb", rgb_only=names)
    argv = ["train", "-m", "data=imagefolder", f"data.root={root}", "data.channels=3,4", "backbone.weights=scratch"]
    assert main([*argv, f"cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "has no alpha channel (mode RGB) but data.channels=4" in err
    assert not (tmp_path / "multirun").exists()  # no job started
