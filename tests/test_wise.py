"""WiSE-FT: the interpolation, its end points against separately evaluated models, and a job."""

from __future__ import annotations

import copy

import mlflow
import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from conftest import FAST
from transferlab.config import compose_config, validate
from transferlab.errors import ConfigError
from transferlab.transfer.module import TransferModule
from transferlab.transfer.stages import map_stages
from transferlab.transfer.wise import evaluate, interpolate, snapshot

SIZE = 32

pytestmark = pytest.mark.usefixtures("native_cpu_kernels")


def test_interpolate_mixes_floats_and_keeps_integer_buffers_fine_tuned() -> None:
    start = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    end = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    mixed = interpolate(start, end, 0.25)
    assert mixed["w"].tolist() == [1.0, 3.0]  # 0.75 * 0 + 0.25 * 4, 0.75 * 2 + 0.25 * 6
    assert mixed["n"].item() == 7


def _data() -> pl.LightningDataModule:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, SIZE, SIZE, generator=generator) * 2 + 1
    y = torch.arange(24) % 2
    sets = {"val_dataset": TensorDataset(x[:12], y[:12]), "test_dataset": TensorDataset(x[12:], y[12:])}
    return pl.LightningDataModule.from_datasets(**sets, batch_size=6)


def _scores(trainer: pl.Trainer, module: TransferModule, data: pl.LightningDataModule) -> dict[str, float]:
    val = trainer.validate(module, datamodule=data, verbose=False)[0]
    return {k: float(v) for k, v in (val | trainer.test(module, datamodule=data, verbose=False)[0]).items()}


def test_alpha_0_is_the_starting_backbone_and_alpha_1_the_fine_tuned_model(cfg) -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    module = TransferModule(backbone, map_stages(backbone), 2, (3, SIZE, SIZE), cfg.finetune, cfg.optim)
    start = snapshot(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module.train()
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # move the weights and the BN statistics
        x = torch.randn(8, 3, SIZE, SIZE, generator=generator) * 3 - 1
        loss = F.cross_entropy(module(x), torch.arange(8) % 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = _data()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    fine_tuned = _scores(trainer, module, data)
    starting = copy.deepcopy(module)  # the starting backbone under the fine-tuned head
    starting.backbone.load_state_dict(start)
    started = _scores(trainer, starting, data)
    assert started["val/loss"] != fine_tuned["val/loss"]  # the two ends really differ

    results, best = evaluate(module, start, [0.0, 0.5, 1.0], trainer, data)
    assert results[0] == pytest.approx(started, abs=1e-6)
    assert results[2] == pytest.approx(fine_tuned, abs=1e-6)
    assert results[1]["val/loss"] not in (started["val/loss"], fine_tuned["val/loss"])
    assert best == max(range(3), key=lambda i: (results[i]["val/acc"], -results[i]["val/loss"]))
    assert _scores(trainer, module, data) == pytest.approx(results[best], abs=1e-6)  # best left loaded


def test_alphas_outside_0_1_fail_validation() -> None:
    with pytest.raises(ConfigError, match=r"finetune.wise_alphas=\[0.5, 1.5\]"):
        validate(compose_config(["backbone.weights=scratch", "finetune.wise_alphas=[0.5,1.5]"]))


@pytest.mark.slow
def test_wise_job_logs_each_alpha_and_reports_the_best_val_alpha(store: str) -> None:
    from transferlab.jobs.run import run

    metrics = run(compose_config([*FAST, "study=wise", "finetune.wise_alphas=[0.0,0.5,1.0]"]))
    client = mlflow.MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("wise").experiment_id])
    history = {k: client.get_metric_history(logged.info.run_id, f"wise/{k}") for k in ("alpha", "val_acc", "test_acc")}
    assert [(m.step, m.value) for m in history["alpha"]] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    best = int(metrics["wise/best_index"])
    assert metrics["wise/best_alpha"] == [0.0, 0.5, 1.0][best]
    assert max(m.value for m in history["val_acc"]) == history["val_acc"][best].value
    assert logged.data.metrics["test/acc"] == history["test_acc"][best].value
    evaluated = metrics["data/val_size"] + metrics["data/test_size"]
    assert metrics["compute/wise_eval_flops"] == 3 * evaluated * metrics["compute/inference_flops_per_sample"]
