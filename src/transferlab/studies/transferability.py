"""Transferability measures: how well frozen features fit a target, in seconds, without training.

- `logme`: LogME (You et al., ICML 2021, arXiv 2102.11005): the log marginal likelihood (evidence)
  of a Bayesian linear model from features to each one-hot label column, maximised over the prior
  and noise precisions by the paper's fixed-point iteration, averaged over classes, per sample.
- `knn_accuracy`: leave-one-out k-nearest-neighbour accuracy on the train split.
- `ridge_probe_accuracy`: a closed-form linear probe (ridge regression to one-hot targets), its
  penalty picked by closed-form leave-one-out on train, scored on the validation split.

All take features [N, D] and integer labels [N]; all are higher-is-better.
"""

from __future__ import annotations

import numpy as np

from transferlab.errors import ConfigError

MEASURES = ("logme", "knn", "probe")


def _check(features: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(f"{name}: features must be [N, D] and labels [N], got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ConfigError(f"{name}: needs at least two classes in the labels")
    if not np.isfinite(x).all():
        raise ConfigError(f"{name}: features contain NaN or inf (a diverged backbone?)")
    return x, y


def _one_hot(labels: np.ndarray) -> np.ndarray:
    classes, index = np.unique(labels, return_inverse=True)
    return np.eye(len(classes))[index]


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-6) -> float:
    """LogME: mean over classes of max_{alpha,beta} log p(y_k | F, alpha, beta) / N.

    Model: y = F w + noise, w ~ N(0, alpha^-1 I), noise ~ N(0, beta^-1 I). With F = U S V^T and
    sigma = S^2, the posterior mean, gamma and both fixed-point updates need only the spectrum and
    z = U^T y (the paper's Algorithm 1, optimised form). Invariant to rotating or scaling F.
    """
    x, y = _check(features, labels, "logme")
    n, d = x.shape
    targets = _one_hot(y)  # [N, K]
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    sigma = s**2  # eigenvalues of F^T F (the rest, up to D, are 0)
    z = u.T @ targets  # [r, K]
    outside = (targets**2).sum(0) - (z**2).sum(0)  # ||y||^2 outside the span of F
    evidences = []
    for k in range(targets.shape[1]):
        zk, alpha, beta = z[:, k], 1.0, 1.0
        for _ in range(max_iter):
            lam = alpha / beta
            gamma = (sigma / (sigma + lam)).sum()
            mm = ((s * zk / (sigma + lam)) ** 2).sum()  # m^T m
            residual = ((lam * zk / (sigma + lam)) ** 2).sum() + max(outside[k], 0.0)  # ||F m - y||^2
            alpha, beta = gamma / max(mm, 1e-300), (n - gamma) / max(residual, 1e-300)
            if abs(alpha / beta - lam) <= tol * lam:
                break
        lam = alpha / beta
        mm = ((s * zk / (sigma + lam)) ** 2).sum()
        residual = ((lam * zk / (sigma + lam)) ** 2).sum() + max(outside[k], 0.0)
        log_det = np.log(alpha + beta * sigma).sum() + (d - len(sigma)) * np.log(alpha)
        evidence = (
            n / 2 * np.log(beta)
            + d / 2 * np.log(alpha)
            - n / 2 * np.log(2 * np.pi)
            - beta / 2 * residual
            - alpha / 2 * mm
            - log_det / 2
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-score every dimension with the train statistics (constant dimensions stay 0)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (Euclidean on standardised features, majority vote, ties to the
    class of the nearer neighbours). k is capped at the smallest class size minus one."""
    x, y = _check(features, labels, "knn")
    (x,) = _standardise(x)
    _, counts = np.unique(y, return_counts=True)
    k = max(1, min(int(k), int(counts.min()) - 1, len(y) - 1))
    sq = (x**2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(dist, np.inf)  # leave the sample itself out
    candidates = np.argpartition(dist, k - 1, axis=1)[:, :k]  # the k nearest, unordered: O(N) per row
    order = np.argsort(np.take_along_axis(dist, candidates, axis=1), axis=1, kind="stable")
    nearest = np.take_along_axis(candidates, order, axis=1)
    classes, index = np.unique(y, return_inverse=True)
    votes = np.zeros((len(y), len(classes)))
    weight = 1.0 + (k - np.arange(k)) / (k * (k + 1))  # each vote counts 1; nearer ones break ties
    np.add.at(votes, (np.arange(len(y))[:, None], index[nearest]), weight[None, :])
    return float((votes.argmax(1) == index).mean())


def ridge_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    penalties: np.ndarray | None = None,
) -> float:
    """Closed-form linear probe: ridge to one-hot targets on standardised features, with an
    unpenalised intercept; the penalty is the one with the best leave-one-out accuracy on
    train (exact, from the hat matrix); scored as val accuracy."""
    x, y = _check(train_x, train_y, "probe")
    vx, vy = np.asarray(val_x, dtype=np.float64), np.asarray(val_y)
    if vx.ndim != 2 or vx.shape[1] != x.shape[1] or len(vx) != len(vy) or len(vy) == 0:
        raise ConfigError(f"probe: val features {vx.shape} do not match train features {x.shape}")
    parts = _ridge_parts(x, y)
    lam = best_ridge_penalty(x, y, penalties, parts)
    return float((ridge_predict(x, y, vx, lam, parts) == vy).mean())


def _ridge_parts(x: np.ndarray, y: np.ndarray):
    """SVD of the standardised (hence centred) train features: the intercept is the target mean.
    Computed once per feature set; every penalty reuses it."""
    mean, std = x.mean(0), np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    u, s, vt = np.linalg.svd((x - mean) / std, full_matrices=False)
    return u, s, vt, _one_hot(y), np.unique(y), mean, std


def ridge_predict(x: np.ndarray, y: np.ndarray, new_x: np.ndarray, lam: float, parts=None) -> np.ndarray:
    """Labels the ridge classifier fitted on (x, y) with penalty `lam` predicts for `new_x`."""
    u, s, vt, targets, classes, mean, std = parts or _ridge_parts(x, y)
    coef = vt.T @ ((s / (s**2 + lam))[:, None] * (u.T @ (targets - targets.mean(0))))
    scores = ((new_x - mean) / std) @ coef + targets.mean(0)
    return classes[scores.argmax(1)]


def ridge_loo_accuracy(x: np.ndarray, y: np.ndarray, lam: float, parts=None) -> float:
    """Exact leave-one-out accuracy of the ridge classifier: y_-i = (y_hat_i - h_ii y_i) / (1 - h_ii)."""
    u, s, _, targets, classes, _, _ = parts or _ridge_parts(x, y)
    shrink = s**2 / (s**2 + lam)
    fitted = targets.mean(0) + u @ (shrink[:, None] * (u.T @ targets))  # u's columns are centred
    hat = (u**2 * shrink).sum(1) + 1.0 / len(y)  # centring adds 1/n (the intercept's leverage)
    loo = (fitted - hat[:, None] * targets) / np.maximum(1.0 - hat, 1e-12)[:, None]
    return float((classes[loo.argmax(1)] == y).mean())


def best_ridge_penalty(x: np.ndarray, y: np.ndarray, penalties: np.ndarray | None = None, parts=None) -> float:
    """The penalty (relative to the sample count) with the best train leave-one-out accuracy; the
    largest on ties (the most regularised of equally good probes)."""
    grid = np.logspace(-3, 3, 13) * len(y) if penalties is None else np.asarray(penalties, dtype=float)
    parts = parts or _ridge_parts(x, y)
    scores = [ridge_loo_accuracy(x, y, lam, parts) for lam in grid]
    best = max(scores)
    return float(max(lam for lam, score in zip(grid, scores) if score == best))
