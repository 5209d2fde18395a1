"""Distillation route (`finetune=distill`): train a student to match a teacher's softened outputs.

The student is the job's backbone (any timm name, scratch or pretrained) with the usual head,
stages and phases; only the training loss changes. The teacher is a whole classifier over the
target's classes: one trained here first (`weights: trained`, cached per config), a logged run's
model (`runs:/<run_id>/model/model.safetensors`, e.g. a source model's run), a local file, or
timm hub weights. It stays in eval mode without gradients and sees the student's own augmented
batch, converted to its input normalisation (Beyer et al. 2022: consistent views matter).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.models import load_state_dict
from torch import nn

from transferlab import tags
from transferlab.data import InputSpec
from transferlab.errors import ConfigError
from transferlab.transfer.backbone import apply_state, build_model, input_spec
from transferlab.transfer.compute import forward_flops, layer_costs
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages

TEACHER_SOURCES = "trained | runs:/<run_id>/model/model.safetensors | a .safetensors/.pth file | pretrained"


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels).

    T^2 keeps the soft term's gradient scale independent of T; alpha=0 is plain training.
    """
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1 - alpha) * hard


class Teacher(nn.Module):
    """A frozen classifier that takes the student's normalised batch and converts it to its own
    normalisation first: x_t = (x_s * std_s + mean_s - mean_t) / std_t."""

    def __init__(self, model: nn.Module, student: InputSpec, own: InputSpec) -> None:
        super().__init__()
        if student.in_chans != own.in_chans:
            raise ConfigError(
                f"the teacher takes {own.in_chans} input channels, the student {student.in_chans}: "
                "set finetune.teacher to a model with the student's backbone.in_chans"
            )
        self.model = model.requires_grad_(False).eval()
        s_mean, s_std = (torch.tensor(v).view(1, -1, 1, 1) for v in (student.mean, student.std))
        t_mean, t_std = (torch.tensor(v).view(1, -1, 1, 1) for v in (own.mean, own.std))
        self.register_buffer("scale", s_std / t_std, persistent=False)
        self.register_buffer("shift", (s_mean - t_mean) / t_std, persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: BN running stats and dropout fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


class ClassifierFromState(nn.Module):
    """A transferlab-logged model (`backbone.*` + `head.*`): the backbone's pooled features into
    the head's Linear layers (ReLU between them, as `model.build_head` made them)."""

    def __init__(self, backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        weights = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("head.") and k.endswith(".weight")}
        layers: list[nn.Module] = [nn.Identity()] * (max(weights) + 1)
        for i, w in weights.items():
            layers[i] = nn.Linear(w.shape[1], w.shape[0])
            if i != max(weights):
                layers[i + 1] = nn.ReLU()
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class TeacherWeights:
    """The teacher as the job resolved it before building (jobs.upstream: trained and cached,
    fetched from a run, or a local file): this route only loads what it is handed."""

    backbone: DictConfig  # the teacher's backbone config (timm name, kwargs, in_chans)
    path: Path | None  # None: timm hub weights with their own classifier
    run_tags: dict[str, str] = field(default_factory=dict)
    fit_flops: float = 0.0  # the teacher's own training, where its run says


def check_teacher_classes(out: int, num_classes: int) -> None:
    """The one rule: a teacher must predict the target's classes."""
    if out != num_classes:
        raise ConfigError(
            f"the teacher predicts {out} classes but the data has {num_classes}: "
            "use a teacher trained on this target (finetune.teacher.weights=trained)"
        )


def load_teacher(weights: TeacherWeights, student: InputSpec, num_classes: int) -> tuple[Teacher, dict[str, str]]:
    """The resolved teacher, checked to predict the target's classes."""
    model, features = _build_classifier(weights.backbone, weights.path)
    own = input_spec(features, weights.backbone)
    # Channels beyond RGB are the data's (data.extra_mean/std), not the backbone's: the teacher
    # sees them normalised as the student does (a trained teacher was trained on this data).
    if own.in_chans == student.in_chans > 3:
        own = replace(own, mean=own.mean[:3] + student.mean[3:], std=own.std[:3] + student.std[3:])
    teacher = Teacher(model, student, own)
    with torch.no_grad():
        out = teacher(torch.zeros(2, student.in_chans, student.size, student.size)).shape[-1]
    check_teacher_classes(out, num_classes)
    teacher.fit_flops = weights.fit_flops
    return teacher, {**weights.run_tags, tags.TEACHER_NAME: str(weights.backbone.name)}


def _build_classifier(backbone_cfg: DictConfig, path: Path | None) -> tuple[nn.Module, nn.Module]:
    """(classifier, the timm model whose pretrained_cfg gives the input normalisation)."""
    import timm

    if path is None:  # timm hub weights with their own classifier
        model = timm.create_model(str(backbone_cfg.name), pretrained=True, in_chans=int(backbone_cfg.in_chans))
        return model, model
    state = load_state_dict(str(path), weights_only=True)
    if any(k.startswith("backbone.") for k in state):
        backbone = build_model(backbone_cfg, pretrained=False)
        apply_state(backbone, {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}, path.name)
        model = ClassifierFromState(backbone, state)
        model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        return model, backbone
    classifier = timm.create_model(str(backbone_cfg.name), pretrained=False, in_chans=int(backbone_cfg.in_chans))
    head = classifier.pretrained_cfg.get("classifier") or ""
    if f"{head}.weight" in state:
        classifier.reset_classifier(state[f"{head}.weight"].shape[0])
    try:
        classifier.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"teacher weights in {path.name} do not fit {backbone_cfg.name} ({str(err).splitlines()[0]}): "
            "check finetune.teacher.name"
        ) from err
    return classifier, classifier


class DistillModule(TransferModule):
    """TransferModule whose training loss is `kd_loss` against a frozen teacher; validation and
    test losses stay plain cross-entropy, comparable with every other strategy."""

    def __init__(self, *args, teacher: Teacher, temperature: float, alpha: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)  # the very batch the student sees, augmentation included
        loss = kd_loss(logits, teacher_logits, y, self.temperature, self.alpha)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The student alone: the logged model is what gets deployed."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(f"{prefix}teacher.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts the student's own state (as `state_dict` gives it, e.g. best-weights restore);
        the teacher is never loaded over."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("teacher.")]
        if strict and (missing or result.unexpected_keys):
            unexpected = result.unexpected_keys[:3]
            raise RuntimeError(f"state does not fit the student: missing {missing[:3]}, unexpected {unexpected}")
        return result


def validate(cfg: DictConfig) -> None:
    ft = cfg.finetune
    if ft.get("teacher") is None or ft.teacher.get("weights") is None:
        raise ConfigError(f"finetune=distill needs finetune.teacher.weights: use {TEACHER_SOURCES}")
    if str(ft.teacher.weights) != "trained" and not ft.teacher.get("name"):
        raise ConfigError("finetune.teacher.name is required for these teacher weights: give its timm model name")


def build(
    cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int, weights: TeacherWeights | None = None
) -> tuple[DistillModule, dict[str, str]]:
    if weights is None:
        raise ConfigError("finetune=distill was built without its teacher: resolve it first (jobs.upstream)")
    teacher, run_tags = load_teacher(weights, spec, num_classes)
    module = DistillModule(
        backbone,
        map_stages(backbone),
        num_classes,
        (spec.in_chans, spec.size, spec.size),
        cfg.finetune,
        cfg.optim,
        teacher=teacher,
        temperature=cfg.finetune.temperature,
        alpha=cfg.finetune.alpha,
    )
    # Compute honesty: every training sample also costs one teacher forward.
    example = torch.zeros(1, spec.in_chans, spec.size, spec.size)
    module.teacher_flops_per_sample = forward_flops(layer_costs(teacher.model, example))
    module.teacher_fit_flops = teacher.fit_flops
    return module, run_tags
