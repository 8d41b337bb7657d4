"""Per-gene mean, variance and gene x gene covariance accumulated over chunks of cells.

Chunks are merged with Chan et al.'s pairwise update, each chunk centred on its own mean first,
so a single pass over a file gives the moments of all its cells without cancellation. The
covariance products run in float32 on the centred chunk (torch; ``products=torch.float64`` for
full precision) and are accumulated in float64; means and variances are float64 throughout.
"""
from __future__ import annotations

import numpy as np
import torch


class GeneMoments:
    """Running moments of cells ``[n, G]``; ``covariance=False`` keeps only the diagonal;
    ``products``: the dtype of the covariance products (module docstring)."""

    def __init__(self, n_genes: int, covariance: bool = True, products: torch.dtype = torch.float32):
        self.n = 0
        self.products = products
        self.mean = np.zeros(n_genes)
        self._m2_diag = np.zeros(n_genes)
        self._m2 = np.zeros((n_genes, n_genes)) if covariance else None

    def update(self, x: np.ndarray) -> None:
        """Add the cells ``x [n, G]``."""
        x = np.asarray(x)
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(0, dtype=np.float64)
        xc = x.astype(np.float64) - mean_b
        m2_diag_b = np.einsum("ij,ij->j", xc, xc)
        m2_b = None
        if self._m2 is not None:
            xt = torch.from_numpy(xc).to(self.products)
            m2_b = (xt.T @ xt).double().numpy()
            np.fill_diagonal(m2_b, m2_diag_b)
        na, n = self.n, self.n + nb
        delta = mean_b - self.mean
        w = na * nb / n
        self._m2_diag += m2_diag_b + delta * delta * w
        if self._m2 is not None:
            self._m2 += m2_b + np.outer(delta, delta) * w
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    @property
    def var(self) -> np.ndarray:
        """Population variance of each gene."""
        return self._m2_diag / max(self.n, 1)

    @property
    def cov(self) -> np.ndarray:
        """Population covariance ``[G, G]``."""
        if self._m2 is None:
            raise ValueError("these moments were accumulated without the covariance")
        out = self._m2 / max(self.n, 1)
        np.fill_diagonal(out, self.var)
        return out
