"""Reference generators scored by the same code as the model."""
from __future__ import annotations

import numpy as np


def gaussian_pca_generator(train: np.ndarray, n: int, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """Sample ``n`` cells from a Gaussian fitted in a PCA space of ``train`` (``n_components``,
    fitted on ``train`` only), mapped back to genes with negative values clipped to 0."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    k = int(min(n_components, train.shape[0] - 1, train.shape[1]))
    pca = PCA(n_components=k, random_state=seed, svd_solver="full").fit(train)
    scores = pca.transform(train)
    mu, cov = scores.mean(0), np.atleast_2d(np.cov(scores, rowvar=False))
    z = rng.multivariate_normal(mu, cov, size=n, method="eigh")
    return np.maximum(pca.inverse_transform(z), 0.0)
