"""Distillation: the KD loss by hand, reduction to plain training, the teacher's view and compute."""

from __future__ import annotations

import copy
import math

import mlflow
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from conftest import FAST
from transferlab.config import compose_config, validate
from transferlab.data import InputSpec
from transferlab.errors import ConfigError
from transferlab.jobs.run import run
from transferlab.jobs.upstream import resolve_teacher
from transferlab.transfer.distill import DistillModule, Teacher, kd_loss, load_teacher
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages

SIZE = 32
SPEC = InputSpec(SIZE, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")


def test_kd_loss_matches_a_hand_computed_value() -> None:
    # Student logits [0, 0]: uniform (1/2, 1/2). Teacher logits [ln 3, 0], at T=2 -> [ln 3 / 2, 0]:
    # p = (sqrt3, 1) / (sqrt3 + 1) = (0.633975, 0.366025).
    # KL(p || uniform) = 0.633975 * ln(1.267949) + 0.366025 * ln(0.732051)
    #                  = 0.633975 * 0.237411 - 0.366025 * 0.311923 = 0.036342; x T^2 = 0.145368.
    # Hard term: CE of uniform on label 0 = ln 2 = 0.693147. alpha = 0.25:
    # 0.25 * 0.145368 + 0.75 * 0.693147 = 0.036342 + 0.519860 = 0.556202.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    loss = kd_loss(student, teacher, torch.tensor([0]), temperature=2.0, alpha=0.25)
    assert loss.item() == pytest.approx(0.556202, abs=1e-5)
    # Pure soft term at T=1: 0.75 * ln 1.5 + 0.25 * ln 0.5 = 0.304099 - 0.173287 = 0.130812.
    soft = kd_loss(student, teacher, torch.tensor([1]), temperature=1.0, alpha=1.0)
    assert soft.item() == pytest.approx(0.130812, abs=1e-5)


def test_kd_loss_with_alpha_zero_is_cross_entropy_whatever_the_teacher() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 8, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    assert torch.equal(kd_loss(student, teacher, labels, 1.0, 0.0), F.cross_entropy(student, labels))


def _student(cfg, pristine: nn.Module, teacher: Teacher | None = None, **kd) -> TransferModule:
    backbone = copy.deepcopy(pristine)
    args = (backbone, map_stages(backbone), 2, (3, SIZE, SIZE), cfg.finetune, cfg.optim)
    torch.manual_seed(1)  # same head init for both students
    if teacher is None:
        return TransferModule(*args)
    return DistillModule(*args, teacher=teacher, **kd)


@pytest.fixture(scope="module")
def pristine() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=0)


def _teacher(spec: InputSpec = SPEC) -> Teacher:
    torch.manual_seed(2)
    return Teacher(timm.create_model("test_resnet", num_classes=2), SPEC, spec)


def _train(module: TransferModule, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    generator = torch.Generator().manual_seed(0)
    for i in range(steps):
        batch = (torch.randn(4, 3, SIZE, SIZE, generator=generator), torch.tensor([0, 1, 0, 1]))
        loss = module.training_step(batch, i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_t1_alpha0_distillation_trains_exactly_like_plain_training(cfg, pristine) -> None:
    plain = _student(cfg, pristine)
    kd = _student(cfg, pristine, _teacher(), temperature=1.0, alpha=0.0)
    _train(plain)
    _train(kd)
    for (name, a), b in zip(plain.state_dict().items(), kd.state_dict().values()):
        assert torch.equal(a, b), name
    # ... while a soft term makes it learn something else.
    other = _student(cfg, pristine, _teacher(), temperature=4.0, alpha=0.9)
    _train(other)
    assert not torch.equal(other.head[-1].weight, plain.head[-1].weight)


def test_teacher_sees_the_students_batch_in_its_own_normalisation_frozen(cfg, pristine) -> None:
    own = InputSpec(SIZE, 3, (0.0, 0.5, 1.0), (1.0, 0.5, 0.25), "bilinear")
    teacher = _teacher(own)
    seen: list[torch.Tensor] = []
    teacher.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    module = _student(cfg, pristine, teacher, temperature=4.0, alpha=0.5)
    before = copy.deepcopy(teacher.state_dict())
    _train(module, steps=1)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))  # the batch _train used
    # Student pixels: v = 0.25 x + 0.5 per channel. Teacher: (v - 0)/1, (v - 0.5)/0.5, (v - 1)/0.25.
    pixels = 0.25 * x + 0.5
    expected = torch.stack([pixels[:, 0], (pixels[:, 1] - 0.5) / 0.5, (pixels[:, 2] - 1.0) / 0.25], dim=1)
    assert torch.allclose(seen[0], expected, atol=1e-6)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # BN running stats did not move
        assert torch.equal(value, before[name]), name
    assert not [k for k in module.state_dict() if k.startswith("teacher.")]  # the logged model is the student


def test_teacher_loads_a_logged_transferlab_model_and_checks_classes(cfg, pristine, tmp_path) -> None:
    trained = _student(cfg, pristine).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    job = OmegaConf.merge(
        compose_config(["backbone.weights=scratch", "finetune=distill"]),
        {"finetune": {"teacher": {"weights": str(path), "name": "test_resnet"}}},
    )
    spec = InputSpec(SIZE, 3, tuple(pristine.pretrained_cfg["mean"]), tuple(pristine.pretrained_cfg["std"]), "bilinear")
    weights = resolve_teacher(job, train=run)
    teacher, tags = load_teacher(weights, spec, num_classes=2)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(teacher(x), trained(x), atol=1e-5)
    assert tags["transferlab.teacher.name"] == "test_resnet"
    with pytest.raises(ConfigError, match="teacher predicts 2 classes but the data has 5"):
        load_teacher(weights, spec, num_classes=5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.temperature=0", "finetune.temperature=0"),
        ("finetune.alpha=1.5", "finetune.alpha=1.5"),
        ("finetune.teacher.weights=runs:/abc/model/model.safetensors", "finetune.teacher.name is required"),
    ],
)
def test_bad_distillation_settings_fail_validation(override: str, message: str) -> None:
    job = compose_config(["backbone.weights=scratch", "finetune=distill", override])
    with pytest.raises(ConfigError, match=message):
        validate(job)


@pytest.mark.slow
def test_distill_job_trains_its_teacher_once_and_counts_its_forward(store: str) -> None:
    teacher = "finetune.teacher.overrides=['backbone.weights=scratch','finetune=fine_tune']"
    common = [*FAST, "study=kd", "finetune=distill", teacher, "backbone.name=test_efficientnet"]
    kd = run(compose_config(common))
    again = run(compose_config([*common, "finetune.alpha=0.5"]))  # same teacher: reused from the cache
    plain = run(compose_config([*FAST, "study=kd", "backbone.name=test_efficientnet"]))
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    roles = sorted(r.data.tags["transferlab.role"] for r in runs)
    assert roles == ["job", "job", "job", "teacher"]
    teacher_flops = kd["compute/teacher_flops_per_sample"]
    (teacher_run,) = [r for r in runs if r.data.tags["transferlab.role"] == "teacher"]
    assert teacher_flops == teacher_run.data.metrics["compute/inference_flops_per_sample"]
    assert teacher_flops > plain["compute/inference_flops_per_sample"]  # test_resnet > test_efficientnet
    assert kd["compute/inference_flops_per_sample"] == plain["compute/inference_flops_per_sample"]
    student_train = plain["compute/train_flops_per_sample"]
    assert kd["compute/train_flops_per_sample"] == pytest.approx(student_train + teacher_flops)
    assert kd["compute/teacher_flops"] == pytest.approx(teacher_flops * kd["compute/train_samples"])
    assert again["compute/teacher_flops_per_sample"] == teacher_flops
    # The teacher's own training is reported beside (not inside) the student's cost.
    assert kd["compute/teacher_fit_flops"] == teacher_run.data.metrics["compute/train_flops"] > 0
    assert plain["compute/teacher_fit_flops"] == 0


def test_report_marks_distillation_with_the_teachers_own_training() -> None:
    import pandas as pd

    from transferlab.studies.plot import TEACHER_LABEL, accuracy_figure
    from transferlab.studies.report import summarize

    def row(strategy: str, seed: int, acc: float, flops: float, teacher: float) -> dict:
        params = {"data.name": "similar", "finetune.strategy": strategy}
        metrics = {"test_acc": acc, "train_size": 30, "train_flops": flops, "teacher_fit_flops": teacher}
        metrics |= {"train_flops_per_sample": 1e9, "fit_seconds": 1.0, "trainable_params": 10}
        return (
            {"run_id": f"{strategy}{seed}", "condition_hash": strategy, "seed": seed}
            | metrics
            | {f"params.{k}": v for k, v in params.items()}
        )

    runs = [row("distill", s, 0.8 + s / 100, 2e9, 5e9) for s in range(3)]
    runs += [row("scratch", s, 0.7 + s / 100, 1e9, 0.0) for s in range(3)]
    tables = summarize(pd.DataFrame(runs))
    by_strategy = tables.summary.set_index("strategy")
    assert by_strategy.loc["distill", "teacher_fit_flops"] == 5e9
    fig = accuracy_figure(tables)
    assert TEACHER_LABEL in [t.get_text() for t in fig.legends[0].get_texts()]
    (ax,) = [a for a in fig.axes if a.get_title()]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1
    start, end = dotted[0].get_xdata()
    assert end - start == pytest.approx(5e9)  # from the distilled point, + the teacher's training


@pytest.mark.parametrize(
    "uri", ["runs:/abc123/model/model.safetensors", "models:/teacher/1", "mlflow-artifacts:/0/abc/artifacts/m.pt"]
)
def test_every_remote_teacher_uri_is_fetched_by_the_one_resolver(uri: str, tmp_path, monkeypatch) -> None:
    """runs:/, models:/ and mlflow-artifacts:/ teachers all go through jobs.upstream.fetch_weights
    (before, an mlflow-artifacts:/ teacher was read as a local file and failed as missing)."""
    from transferlab.jobs import upstream

    fetched = tmp_path / "teacher.safetensors"
    fetched.write_bytes(b"")
    asked = []
    monkeypatch.setattr(upstream, "fetch_weights", lambda u, cfg, field: asked.append((u, field)) or fetched)
    job = OmegaConf.merge(
        compose_config(["backbone.weights=scratch", "finetune=distill"]),
        {"finetune": {"teacher": {"weights": uri, "name": "test_resnet"}}},
    )
    weights = resolve_teacher(job, train=run)
    assert asked == [(uri, "finetune.teacher.weights")]
    assert weights.path == fetched
