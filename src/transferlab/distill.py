"""Distillation route (`finetune=distill`): train a student to match a teacher's softened outputs.

The student is the job's backbone (any timm name, scratch or pretrained) with the usual head,
stages and phases; only the training loss changes. The teacher is a whole classifier over the
target's classes: one trained here first (`weights: trained`, cached per config), a logged run's
model (`runs:/<run_id>/model/model.safetensors`, e.g. a source model's run), a local file, or
timm hub weights. It stays in eval mode without gradients and sees the student's own augmented
batch, converted to its input normalisation (Beyer et al. 2022: consistent views matter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.models import load_state_dict
from torch import nn

from transferlab.cache import ensure, read_manifest
from transferlab.compute import forward_flops, layer_costs
from transferlab.data import InputSpec
from transferlab.errors import ConfigError
from transferlab.model import TransferModule
from transferlab.stages import map_stages
from transferlab.weights import apply_state, build_model, input_spec

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


def load_teacher(cfg: DictConfig, student: InputSpec, num_classes: int) -> tuple[Teacher, dict[str, str]]:
    """The configured teacher, checked to predict the target's classes."""
    tcfg = cfg.finetune.teacher
    weights = str(tcfg.weights)
    tags = {"transferlab.teacher.weights": weights}
    fit_flops = 0.0  # the teacher's own training, where its run says
    if weights == "trained":
        path, backbone_cfg, meta = train_teacher(cfg)
        tags["transferlab.teacher.run_id"] = meta["run_id"]
        fit_flops = float(meta.get("train_flops", 0.0))
    else:
        backbone_cfg = OmegaConf.merge(cfg.backbone, {"name": tcfg.name, "kwargs": tcfg.kwargs or {}})
        path = None
        if weights.startswith("runs:/") or weights.startswith("models:/"):
            from transferlab.pretrain import fetch_artifact

            path = fetch_artifact(weights, cfg, "finetune.teacher.weights")
            fit_flops = _run_train_flops(cfg, weights)
        elif weights != "pretrained":
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ConfigError(f"finetune.teacher.weights file {weights!r} does not exist: use {TEACHER_SOURCES}")
    model, features = _build_classifier(backbone_cfg, path)
    teacher = Teacher(model, student, input_spec(features, backbone_cfg))
    with torch.no_grad():
        out = teacher(torch.zeros(2, student.in_chans, student.size, student.size)).shape[-1]
    if out != num_classes:
        raise ConfigError(
            f"the teacher predicts {out} classes but the data has {num_classes}: "
            "use a teacher trained on this target (finetune.teacher.weights=trained)"
        )
    tags["transferlab.teacher.name"] = str(backbone_cfg.name)
    teacher.fit_flops = fit_flops
    return teacher, tags


def _run_train_flops(cfg: DictConfig, uri: str) -> float:
    """`compute/train_flops` of the run a `runs:/` teacher came from (0 when not logged)."""
    if not uri.startswith("runs:/"):
        return 0.0
    import mlflow

    from transferlab.tracking import tracking_uri

    try:
        run = mlflow.MlflowClient(tracking_uri(cfg.tracking)).get_run(uri.split("/")[1])
    except Exception:  # another store, a deleted run: the cost is unknown, not an error
        return 0.0
    return float(run.data.metrics.get("compute/train_flops", 0.0))


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


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The teacher job for `weights: trained`: `finetune.teacher.overrides` (its backbone and
    strategy) on this job's data, seed, trainer, tracking and cache."""
    from transferlab.config import compose_config

    tcfg = compose_config(list(cfg.finetune.teacher.overrides))
    if tcfg.finetune.strategy == "distill":
        raise ConfigError("finetune.teacher.overrides select finetune=distill: give the teacher its own strategy")
    for key in ("data", "trainer", "tracking", "seed", "cache_dir", "study"):
        OmegaConf.update(tcfg, key, OmegaConf.to_container(cfg, resolve=True)[key], merge=False)
    OmegaConf.update(tcfg, "tracking.log_model", True)  # the teacher is read back from its run
    OmegaConf.update(tcfg, "tracking.resume", False)  # the cached file counts, not a run somewhere
    return tcfg


def train_teacher(cfg: DictConfig) -> tuple[Path, DictConfig, dict]:
    """Fine-tune the teacher once per teacher config (its own MLflow run, role `teacher`) and
    cache its whole model; parallel jobs wait for one build."""
    from transferlab.identity import config_hash
    from transferlab.pretrain import fetch_artifact
    from transferlab.train import run

    tcfg = teacher_config(cfg)

    def build(folder: Path) -> dict[str, str]:
        print(f"training the distillation teacher ({tcfg.backbone.name}, {tcfg.finetune.strategy})", flush=True)
        metrics = run(tcfg, role="teacher", backbone_out=folder / "backbone.safetensors")
        run_id = json.loads((folder / "run.json").read_text())["run_id"]
        fetched = fetch_artifact(f"runs:/{run_id}/model/model.safetensors", cfg, "finetune.teacher.weights")
        (folder / "model.safetensors").write_bytes(fetched.read_bytes())
        return {"run_id": run_id, "train_flops": metrics["compute/train_flops"]}

    folder = ensure(cfg.cache_dir, "teachers", config_hash(tcfg), build)
    return folder / "model.safetensors", tcfg.backbone, read_manifest(folder)["meta"]


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
    if not float(ft.temperature) > 0:
        raise ConfigError(f"finetune.temperature={ft.temperature} must be > 0 (Hinton et al. use 1-20; timm 4)")
    if not 0 <= float(ft.alpha) <= 1:
        raise ConfigError(f"finetune.alpha={ft.alpha} must lie in [0, 1] (the soft-target weight)")


def build(
    cfg: DictConfig, backbone: nn.Module, spec: InputSpec, num_classes: int
) -> tuple[DistillModule, dict[str, str]]:
    teacher, tags = load_teacher(cfg, spec, num_classes)
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
    return module, tags
