"""Molecular cross-validation (Batson et al. 2019) of denoisers, and the baseline denoisers.

Counts are split by binomial thinning into halves A and B (:func:`scidiff.tasks.denoise.binomial_split`);
a method denoises A and is scored against B, which shares the cells' true expression but not
their sampling noise. Two scores, as in the Open Problems denoising task:

- ``poisson_loss``: the mean Poisson negative log-likelihood ``mean(lambda - B log lambda)``
  of B's counts under the denoised rates ``lambda`` (A's denoised counts rescaled by
  ``sum(B) / sum(A)``);
- ``mse``: the mean squared error between denoised A and B after each is normalised to 10,000
  counts per cell and log1p-transformed.

Every denoiser here returns expected counts on A's scale (cells x genes).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _dense(m) -> np.ndarray:
    return (m.toarray() if sp.issparse(m) else np.asarray(m)).astype(np.float64)


def _log_norm(m: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    totals = m.sum(1, keepdims=True)
    return np.log1p(np.divide(m * target_sum, totals, out=np.zeros_like(m), where=totals > 0))


def _same_shape(denoised: np.ndarray, test: np.ndarray, *others) -> None:
    """Refuse matrices that numpy would broadcast against each other (a score of other cells or genes)."""
    shapes = [m.shape for m in (denoised, test, *others)]
    if len(set(shapes)) > 1:
        raise ValueError(f"the denoised, test (and train) matrices must be cells x genes of the same shape, got "
                         f"{' vs '.join(str(s) for s in shapes)}")


def poisson_loss(denoised: np.ndarray, train, test) -> float:
    """Mean Poisson NLL of ``test`` counts given ``denoised`` (on ``train``'s scale)."""
    denoised, train, test = _dense(denoised), _dense(train), _dense(test)
    _same_shape(denoised, test, train)
    rates = np.maximum(denoised, 0) * test.sum() / max(float(train.sum()), 1e-12)
    return float(np.mean(rates - test * np.log(rates + 1e-6)))


def mse(denoised: np.ndarray, test) -> float:
    """MSE between the log1p-normalised denoised counts and log1p-normalised ``test`` counts."""
    denoised, test = _dense(denoised), _dense(test)
    _same_shape(denoised, test)
    return float(np.mean((_log_norm(np.maximum(denoised, 0)) - _log_norm(test)) ** 2))


def mcv_scores(denoised, train, test) -> dict:
    return {"poisson_loss": poisson_loss(denoised, train, test), "mse": mse(denoised, test)}


def counts_from_log(log_expression: np.ndarray, library: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """Expected counts from log1p-normalised expression: ``expm1(x) / target_sum * library``
    (``library``: one total per cell, a vector or a column as ``counts.sum(1)`` gives)."""
    log_expression = np.asarray(log_expression)
    library = np.asarray(library, dtype=np.float64).ravel()
    if log_expression.ndim != 2 or len(library) != len(log_expression):
        raise ValueError(f"library must hold one total per cell of the {log_expression.shape} expression, got "
                         f"{len(library)} values")
    return np.maximum(np.expm1(log_expression), 0) / target_sum * library[:, None]


# -- baselines ------------------------------------------------------------------------------------

def raw_denoiser(train) -> np.ndarray:
    """No denoising: half A itself."""
    return _dense(train)


def pca_denoiser(train, n_components: int, seed: int = 0) -> np.ndarray:
    """Rank-``n_components`` PCA reconstruction in log1p-normalised space, mapped back to counts."""
    from sklearn.decomposition import PCA

    a = _dense(train)
    lib = a.sum(1)
    x = _log_norm(a)
    k = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    pca = PCA(k, random_state=seed, svd_solver="randomized" if min(x.shape) > 500 else "full").fit(x)
    return counts_from_log(pca.inverse_transform(pca.transform(x)), lib)


def knn_denoiser(train, k: int = 15, n_pcs: int = 30, seed: int = 0) -> np.ndarray:
    """kNN smoothing (MAGIC-like, one diffusion step): each cell's normalised expression is the
    mean over itself and its ``k`` nearest neighbours in ``n_pcs`` PCs of half A."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    a = _dense(train)
    lib = a.sum(1)
    x = _log_norm(a)
    pcs = PCA(int(min(n_pcs, x.shape[0] - 1, x.shape[1])), random_state=seed).fit_transform(x)
    idx = NearestNeighbors(n_neighbors=min(k + 1, len(x))).fit(pcs).kneighbors(pcs, return_distance=False)
    return counts_from_log(np.log1p(np.expm1(x)[idx].mean(1)), lib)


def best_pca_denoiser(train, test, grid=(2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100), score: str = "mse",
                      seed: int = 0) -> tuple[int, np.ndarray, dict]:
    """PCA with the number of components chosen by molecular cross-validation on ``score``."""
    if score not in ("mse", "poisson_loss"):
        raise ValueError(f"score must be 'mse' or 'poisson_loss', got {score!r}")
    results = {}
    best = None
    for k in grid:
        if k >= min(_dense(train).shape):
            continue
        d = pca_denoiser(train, k, seed)
        s = mcv_scores(d, train, test)
        results[k] = s
        if best is None or s[score] < best[2][score]:
            best = (k, d, s)
    if best is None:
        raise ValueError(f"no number of components in {list(grid)} is below the smaller side of the "
                         f"{_dense(train).shape} matrix")
    return best[0], best[1], results
