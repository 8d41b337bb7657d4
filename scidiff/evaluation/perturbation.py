"""Perturbation-prediction metrics and the baselines every prediction is compared with.

Metrics compare predicted cells with the real perturbed cells of the same group, using the
group's real control cells for deltas; all act on log1p-normalised expression:

- ``scgen_r2``: scGen's R², the squared Pearson correlation of per-gene means (Lotfollahi et al.
  2019), on all genes and on the top-100 DEGs;
- ``r2_top50``: sklearn's coefficient of determination of the per-gene means on the top-50 DEGs;
- ``pearson_delta``: Pearson correlation of (predicted mean - control mean) with (observed mean -
  control mean), on all genes and the top-20 DEGs;
- ``mse_top20``: mean squared error of per-gene means on the top-20 DEGs;
- ``e_distance``: the E-distance of scPerturb (Peidli et al. 2024), ``2 d(X,Y) - d(X,X) - d(Y,Y)``
  with ``d`` the mean pairwise squared Euclidean distance, in a 30-PC space of real cells;
- ``mmd``: RBF-MMD in that space (:func:`scidiff.evaluation.mmd_rbf`).

DEGs are ranked by scanpy's Wilcoxon test of the real perturbed against the real control cells
of the group.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from .metrics import _pearson, mmd_rbf


def rank_degs(perturbed: np.ndarray, control: np.ndarray, genes, n: int = 100) -> list[str]:
    """Top ``n`` genes by scanpy's Wilcoxon score, perturbed vs control (log1p input)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    both = ad.AnnData(X=np.vstack([perturbed, control]).astype(np.float32),
                      obs=pd.DataFrame({"group": pd.Categorical(["perturbed"] * len(perturbed)
                                                                + ["control"] * len(control))}))
    both.var_names = [str(g) for g in genes]
    sc.tl.rank_genes_groups(both, "group", groups=["perturbed"], reference="control", method="wilcoxon",
                            n_genes=n, tie_correct=False)
    return [str(g) for g in both.uns["rank_genes_groups"]["names"]["perturbed"][:n]]


def scgen_r2(pred_mean: np.ndarray, true_mean: np.ndarray) -> float:
    """Squared Pearson correlation of per-gene means."""
    return _pearson(pred_mean, true_mean) ** 2


def e_distance(x: np.ndarray, y: np.ndarray) -> float:
    """scPerturb's E-distance with squared Euclidean distances (self-pairs excluded)."""
    def within(a):
        d = cdist(a, a, "sqeuclidean")
        return d.sum() / max(len(a) * (len(a) - 1), 1)

    return float(2 * cdist(x, y, "sqeuclidean").mean() - within(x) - within(y))


def perturbation_metrics(pred: np.ndarray, true: np.ndarray, control: np.ndarray, genes, degs: list[str],
                         project=None) -> dict:
    """Every metric of the module docstring for one group. ``degs``: genes ranked by DEG score
    (at least 100); ``project``: a function to PCA scores (fitted on real cells) for the
    distribution distances."""
    from sklearn.metrics import r2_score

    index = {str(g): i for i, g in enumerate(genes)}
    idx = np.array([index[g] for g in degs])
    pm, tm, cm = pred.mean(0), true.mean(0), control.mean(0)
    out = {"scgen_r2_all": scgen_r2(pm, tm), "scgen_r2_top100": scgen_r2(pm[idx[:100]], tm[idx[:100]]),
           "r2_top50": float(r2_score(tm[idx[:50]], pm[idx[:50]])),
           "pearson_delta_all": _pearson(pm - cm, tm - cm),
           "pearson_delta_top20": _pearson(pm[idx[:20]] - cm[idx[:20]], tm[idx[:20]] - cm[idx[:20]]),
           "mse_top20": float(np.mean((pm[idx[:20]] - tm[idx[:20]]) ** 2))}
    if project is not None:
        pp, tp = project(pred), project(true)
        out["e_distance"] = e_distance(pp, tp)
        out["mmd"] = mmd_rbf(tp, pp)
    return out


# -- baselines ------------------------------------------------------------------------------------

def no_change(control: np.ndarray) -> np.ndarray:
    """The control cells themselves."""
    return control.copy()


def mean_shift(control: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    """Control cells plus the mean of the per-group deltas (perturbed mean - control mean) seen in
    other groups (cell types). Not clipped, so its means are exactly control + delta."""
    return control + np.mean(deltas, axis=0)


def additive(control: np.ndarray, single_deltas: list[np.ndarray]) -> np.ndarray:
    """Control cells plus the sum of the single perturbations' deltas (``A+B`` -> ``dA + dB``)."""
    return control + np.sum(single_deltas, axis=0)


class LinearPerturbationModel:
    """Ridge regression from a perturbation embedding (a multi-hot of single perturbations,
    optionally with covariate one-hots) to the mean expression delta against control; predicts
    a new group as its control cells plus the predicted delta."""

    def __init__(self, alpha: float = 1.0):
        from sklearn.linear_model import Ridge

        self.model = Ridge(alpha=alpha, fit_intercept=False)

    def fit(self, features: np.ndarray, deltas: np.ndarray) -> "LinearPerturbationModel":
        self.model.fit(np.asarray(features, float), np.asarray(deltas, float))
        return self

    def predict(self, control: np.ndarray, features: np.ndarray) -> np.ndarray:
        return control + self.model.predict(np.asarray(features, float).reshape(1, -1))[0]
