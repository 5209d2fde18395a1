"""The L-BFGS logistic-regression probe: penalty chosen on val, weights folded back, run as a job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from conftest import FAST
from transferlab.config import compose_config, validate
from transferlab.errors import ConfigError
from transferlab.jobs.run import run
from transferlab.transfer.linear_probe import fit_logistic, set_linear_head


def _blobs(n: int, dims: int, classes: int, seed: int, noise_dims: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 3, (classes, dims))
    y = np.arange(n) % classes
    x = centres[y] + rng.normal(0, 1, (n, dims))
    return np.hstack([x, rng.normal(5, 4, (n, noise_dims))]) * 7 + 3, y  # unscaled, shifted features


def test_folded_weights_predict_what_the_fitted_model_predicts_on_raw_features() -> None:
    train_x, train_y = _blobs(90, 6, 3, seed=0)
    val_x, val_y = _blobs(60, 6, 3, seed=1)
    fit = fit_logistic(train_x, train_y, val_x, val_y, num_classes=3)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    reference = LogisticRegression(C=fit.penalty, max_iter=1000).fit((train_x - mean) / std, train_y)
    ours = (val_x @ fit.weight.T + fit.bias).argmax(1)
    assert (ours == reference.predict((val_x - mean) / std)).all()
    assert fit.val_acc == pytest.approx((ours == val_y).mean())
    assert fit.val_acc > 0.9


def test_the_penalty_is_the_best_one_on_val() -> None:
    train_x, train_y = _blobs(12, 2, 3, seed=2, noise_dims=200)  # few samples, many useless features
    val_x, val_y = _blobs(300, 2, 3, seed=3, noise_dims=200)
    fit = fit_logistic(train_x, train_y, val_x, val_y, num_classes=3)
    assert fit.val_acc == max(fit.val_acc_by_penalty.values())
    assert len(fit.val_acc_by_penalty) > 5
    assert fit.iterations > 0


def test_a_class_without_train_images_is_never_predicted() -> None:
    train_x, train_y = _blobs(60, 4, 3, seed=4)
    keep = train_y != 2
    fit = fit_logistic(train_x[keep], train_y[keep], train_x, train_y, num_classes=3)
    assert ((train_x @ fit.weight.T + fit.bias).argmax(1) != 2).all()


def test_the_fit_loads_into_a_linear_head_only() -> None:
    train_x, train_y = _blobs(30, 4, 2, seed=5)
    fit = fit_logistic(train_x, train_y, train_x, train_y, num_classes=2)
    head = nn.Sequential(nn.Linear(4, 2))
    set_linear_head(head, fit)
    logits = head(torch.as_tensor(train_x, dtype=torch.float32)).detach().numpy()
    assert (logits.argmax(1) == (train_x @ fit.weight.T + fit.bias).argmax(1)).all()
    with pytest.raises(ConfigError, match="head.hidden"):
        set_linear_head(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), fit)


def test_lbfgs_needs_a_linear_head_on_cached_features() -> None:
    with pytest.raises(ConfigError, match="finetune.head_solver=lbfgs"):
        validate(compose_config([*FAST, "finetune=probe", "finetune.head_solver=lbfgs", "finetune.head.hidden=[8]"]))
    with pytest.raises(ConfigError, match="finetune.head_solver='adam'"):
        validate(compose_config([*FAST, "finetune=probe", "finetune.head_solver=adam"]))


def test_a_probe_job_solved_by_lbfgs_is_deterministic_and_counts_its_compute(store: str) -> None:
    job = [*FAST, "finetune=probe", "finetune.head_solver=lbfgs", "tracking.resume=false"]
    first = run(compose_config([*job, "study=lbfgs"]))
    again = run(compose_config([*job, "study=lbfgs_again"]))
    assert first["test/acc"] == again["test/acc"]
    assert first["compute/train_flops"] > 0
    assert first["compute/epochs"] == 0  # no SGD epoch ran


def test_the_same_inputs_are_solved_once_per_process(monkeypatch) -> None:
    """Seeds of a whole-data probe give the solver the same inputs: the later ones reuse the first
    fit (no L-BFGS run), get equal weights, and cannot corrupt it; any changed input solves anew."""
    import transferlab.transfer.linear_probe as lp

    monkeypatch.setattr(lp, "SOLVED", type(lp.SOLVED)())
    fits = []
    real_fit = LogisticRegression.fit
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    train_x, train_y = _blobs(60, 5, 3, seed=6)
    val_x, val_y = _blobs(30, 5, 3, seed=7)
    first = fit_logistic(train_x, train_y, val_x, val_y, num_classes=3)
    solved = len(fits)
    assert solved == len(lp.PENALTIES)
    assert not first.reused
    first.weight[:] = 0  # a caller's change must not reach the next job
    again = fit_logistic(train_x.copy(), train_y.copy(), val_x, val_y, num_classes=3)
    assert again.reused
    assert len(fits) == solved
    assert np.abs(again.weight).sum() > 0
    assert again.penalty == first.penalty
    relabelled = train_y.copy()
    relabelled[0] = (relabelled[0] + 1) % 3
    other = fit_logistic(train_x, relabelled, val_x, val_y, num_classes=3)
    assert not other.reused
    assert len(fits) == 2 * solved
