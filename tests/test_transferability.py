"""Transferability measures against answers known by construction or by an independent method."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats
from sklearn.linear_model import Ridge, RidgeClassifier

from transferlab.errors import ConfigError
from transferlab.studies.transferability import (
    best_ridge_penalty,
    knn_accuracy,
    logme,
    ridge_loo_accuracy,
    ridge_predict,
    ridge_probe_accuracy,
)


def _blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int = 0):
    """Gaussian clusters around random centres; small spread = separable."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), dim)) * spread, y


def _evidence_by_covariance(x: np.ndarray, labels: np.ndarray) -> float:
    """Independent LogME: maximise log N(y; 0, F F^T / alpha + I / beta) numerically per class."""
    n = len(labels)
    gram = x @ x.T
    total = 0.0
    for k in np.unique(labels):
        y = (labels == k).astype(float)

        def neg(log_ab, y=y):
            alpha, beta = np.exp(log_ab)
            cov = gram / alpha + np.eye(n) / beta
            return -stats.multivariate_normal(mean=np.zeros(n), cov=cov).logpdf(y)

        best = optimize.minimize(neg, x0=np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10})
        total += -best.fun / n
    return total / len(np.unique(labels))


def test_logme_is_the_maximised_evidence():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    labels = (x[:, 0] + 0.5 * rng.normal(size=30) > 0).astype(int)
    assert logme(x, labels) == pytest.approx(_evidence_by_covariance(x, labels), abs=1e-4)


def test_logme_more_dims_than_samples_matches_the_covariance_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 20))
    labels = np.arange(12) % 3
    assert logme(x, labels) == pytest.approx(_evidence_by_covariance(x, labels), abs=1e-4)


def test_logme_invariances():
    x, y = _blobs(15, 3, 6, spread=1.5)
    base = logme(x, y)
    rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(6, 6)))
    perm = np.random.default_rng(4).permutation(len(y))
    assert logme(x @ rotation, y) == pytest.approx(base, abs=1e-8)  # rotated features
    assert logme(x * 7.5, y) == pytest.approx(base, abs=1e-6)  # scaled features: alpha absorbs it
    assert logme(x[perm], y[perm]) == pytest.approx(base, abs=1e-10)  # sample order
    assert logme(x, (y + 1) % 3) == pytest.approx(base, abs=1e-10)  # class names


def test_scores_rank_separable_above_random_labels():
    x, y = _blobs(20, 4, 8, spread=0.3)
    shuffled = np.random.default_rng(5).permutation(y)
    assert logme(x, y) > logme(x, shuffled) + 0.1
    assert knn_accuracy(x, y) == 1.0
    assert knn_accuracy(x, shuffled) < 0.5
    vx, vy = _blobs(10, 4, 8, spread=0.3, seed=0)  # same centres (same seed), new noise
    assert ridge_probe_accuracy(x, y, vx, vy) == 1.0


def test_scores_fall_as_classes_overlap():
    spreads = [0.3, 1.5, 3.0, 8.0]
    data = [_blobs(25, 3, 5, spread=s, seed=7) for s in spreads]
    val = [_blobs(25, 3, 5, spread=s, seed=7) for s in spreads]  # same centres; noise repeats: fine
    for scores in (
        [logme(x, y) for x, y in data],
        [knn_accuracy(x, y) for x, y in data],
        [ridge_probe_accuracy(x, y, vx + 0.0, vy) for (x, y), (vx, vy) in zip(data, val)],
    ):
        assert scores == sorted(scores, reverse=True), scores
        assert scores[0] > scores[-1]


def test_knn_known_small_cases():
    line = np.array([[0.0], [1.0], [5.0], [6.0]])
    assert knn_accuracy(line, np.array([0, 0, 1, 1]), k=1) == 1.0  # each nearest is its twin
    assert knn_accuracy(line, np.array([0, 1, 0, 1]), k=1) == 0.0  # each nearest has the other label
    # k=3 on 0,1,2 | 10,11,12 with one odd label: majority outvotes it, and it loses its own vote.
    points = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    labels = np.array([0, 0, 1, 1, 1, 1])
    assert knn_accuracy(points, labels, k=3) == pytest.approx(5 / 6)
    # A feature scaled a million times does not drown the others (features are standardised).
    scaled = np.c_[line * 1e6, [0, 0, 1, 1]]
    assert knn_accuracy(scaled, np.array([0, 0, 1, 1]), k=1) == 1.0


def test_ridge_probe_matches_scikit_learn():
    x, y = _blobs(12, 3, 5, spread=2.5, seed=8)
    vx, _ = _blobs(12, 3, 5, spread=2.5, seed=9)
    mean, std = x.mean(0), x.std(0)
    for lam in (0.1, 5.0, 80.0):
        ours = ridge_predict(x, y, vx, lam)
        theirs = RidgeClassifier(alpha=lam).fit((x - mean) / std, y).predict((vx - mean) / std)
        assert (ours == theirs).all()


def test_ridge_leave_one_out_matches_refitting():
    x, y = _blobs(6, 3, 4, spread=3.0, seed=10)
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std  # standardised once on all of train, as the probe does
    onehot = np.eye(3)[y]
    for lam in (0.5, 20.0):
        hits = 0
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            model = Ridge(alpha=lam).fit(xs[keep], onehot[keep])
            hits += model.predict(xs[i : i + 1]).argmax() == y[i]
        assert ridge_loo_accuracy(x, y, lam) == pytest.approx(hits / len(y))


def test_ridge_penalty_is_the_best_leave_one_out_and_the_largest_on_ties():
    rng = np.random.default_rng(11)
    x = np.c_[np.repeat([0.0, 1.0], 10) + 0.3 * rng.normal(size=20), rng.normal(size=(20, 60))]
    y = np.repeat([0, 1], 10)
    grid = np.logspace(-4, 4, 9)
    chosen = best_ridge_penalty(x, y, grid)
    scores = {lam: ridge_loo_accuracy(x, y, lam) for lam in grid}
    assert scores[chosen] == max(scores.values())
    assert chosen == max(lam for lam, s in scores.items() if s == scores[chosen])
    separable = np.repeat([[0.0], [1.0]], 10, axis=0)  # every small penalty is perfect: the largest
    assert best_ridge_penalty(separable, y, [1e-3, 1e-2, 1e-1]) == 1e-1


def test_measures_refuse_bad_input():
    with pytest.raises(ConfigError, match="two classes"):
        logme(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ConfigError, match="NaN"):
        knn_accuracy(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="do not match"):
        ridge_probe_accuracy(np.ones((4, 2)), np.array([0, 1, 0, 1]), np.ones((3, 5)), np.zeros(3))
