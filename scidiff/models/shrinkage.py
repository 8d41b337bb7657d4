"""Adaptive shrinkage of estimated changes toward zero (Stephens 2017, "False discovery rates: a new
deal", Biostatistics 18:275, the ``ashr`` normal-mixture prior).

Each row holds one group's estimated changes over the genes, ``d_g``, with their squared standard
errors ``s_g^2``. The true changes are given the prior ``sum_k pi_k N(0, sigma_k^2)`` on a fixed
grid of scales (a point mass at zero first), whose weights are fitted per row by EM on the
marginal likelihood ``d_g ~ sum_k pi_k N(0, sigma_k^2 + s_g^2)``, with ashr's null-biased penalty
(a Dirichlet weight of 10 on the point mass) so that a row without signal is set to zero. The
posterior mean ``sum_k w_gk d_g sigma_k^2 / (sigma_k^2 + s_g^2)`` keeps large, well-measured
changes and sets noise to zero: a knockout that changes nothing is predicted to change nothing,
one that changes a few genes keeps them.
"""
from __future__ import annotations

import numpy as np

NULL_WEIGHT = 10.0  # ashr's default penalty on the point mass at zero
GRID_FACTOR = np.sqrt(2.0)  # ashr's default spacing of the prior's scales


def _grid(d: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """ashr's default scales: from a tenth of the smallest standard error to twice the largest
    change beyond its noise, spaced by sqrt(2); zero first."""
    lo = np.sqrt(s2.min()) / 10
    hi = 2 * np.sqrt(max(float(np.max(d**2 - s2)), float(s2.min()) * 4))
    n = max(2, int(np.ceil(np.log(hi / lo) / np.log(GRID_FACTOR))) + 1)
    return np.concatenate([[0.0], np.geomspace(lo, hi, n)])


def adaptive_shrinkage(d: np.ndarray, s2: np.ndarray, iterations: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Posterior means of the changes ``d [M, G]`` (or ``[G]``) with squared standard errors
    ``s2`` (same shape) under each row's fitted normal-mixture prior (module docstring)."""
    d, s2 = np.asarray(d, np.float64), np.asarray(s2, np.float64)
    flat = d.ndim == 1
    d2, v2 = np.atleast_2d(d), np.atleast_2d(s2)
    out = np.zeros_like(d2)
    for i, (row, var) in enumerate(zip(d2, v2)):
        if not np.any(row):
            continue
        var = np.maximum(var, max(float(var.max()), 1e-30) * 1e-12)
        scale2 = _grid(row, var) ** 2
        total = scale2[None, :] + var[:, None]  # [G, K]
        loglik = -0.5 * row[:, None] ** 2 / total - 0.5 * np.log(total)
        lik = np.exp(loglik - loglik.max(1, keepdims=True))
        penalty = np.zeros(len(scale2))
        penalty[0] = NULL_WEIGHT - 1
        pi = np.full(len(scale2), 1.0 / len(scale2))
        for _ in range(iterations):
            w = lik * pi
            w /= w.sum(1, keepdims=True)
            new = w.sum(0) + penalty
            new /= new.sum()
            done = np.abs(new - pi).max() < tol
            pi = new
            if done:
                break
        w = lik * pi
        w /= w.sum(1, keepdims=True)
        out[i] = row * (w * (scale2[None, :] / total)).sum(1)
    return out[0] if flat else out
