"""Perturbation-prediction metrics and the baselines every prediction is compared with.

Metrics compare predicted cells with the real perturbed cells of the same group, using the
group's real control cells for deltas; all act on log1p-normalised expression:

- ``scgen_r2``: scGen's R², the squared Pearson correlation of per-gene means (Lotfollahi et al.
  2019), on all genes and on the top-100 DEGs;
- ``r2_top50``: sklearn's coefficient of determination of the per-gene means on the top-50 DEGs;
- ``pearson_delta``: Pearson correlation of (predicted mean - control mean) with (observed mean -
  control mean), on all genes and the top-20 DEGs (scGen/CPA's "delta correlation", cell-eval's
  ``pearson_delta``);
- ``rmse_all`` / ``mae_all``: root mean squared and mean absolute error of the per-gene means
  over all genes (the mean-level errors of Ahlmann-Eltze et al. 2025 and of cell-eval's ``mae``);
- ``mse_top20``: mean squared error of per-gene means on the top-20 DEGs;
- ``e_distance``: the E-distance of scPerturb (Peidli et al. 2024), ``2 d(X,Y) - d(X,X) - d(Y,Y)``
  with ``d`` the mean pairwise squared Euclidean distance, in a 30-PC space of real cells;
- ``mmd``: RBF-MMD in that space (:func:`scidiff.evaluation.mmd_rbf`);
- :func:`discrimination_score`: the perturbation discrimination score (PDS) of the Arc Virtual
  Cell Challenge / cell-eval, over several perturbations at once.

DEGs are ranked by scanpy's Wilcoxon test of the real perturbed against the real control cells
of the group.

Baselines (numpy cores, and :func:`predict_baseline` over AnnData with one signature for all):
no change, mean shift, cell mean ("perturbed mean"), additive, linear (ridge on a feature vector;
for time, interpolation between the flanking measured times).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np
from scipy.spatial.distance import cdist

from ..checks import condition_mapping
from ..data.dataset import joined_otherwise
from ..data.io import read_h5ad
from ..data.gene_symbols import symbol_column, symbol_index, symbols_of
from ..data.perturbation_features import resolve_genes
from ..data.spec import canonical_label, perturbed_input_error
from .metrics import _pearson, mmd_rbf

BASELINES = ("no-change", "mean-shift", "cell-mean", "additive", "linear")
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-4.0, 3.25, 0.25))  # the linear baseline's penalties tried (1e-4 to 1e3)


def rank_degs(perturbed: np.ndarray, control: np.ndarray, genes, n: int = 100) -> list[str]:
    """Top ``n`` genes by scanpy's Wilcoxon score, perturbed vs control (log1p input)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    groups = pd.Categorical(["perturbed"] * len(perturbed) + ["control"] * len(control))
    both = ad.AnnData(X=np.vstack([perturbed, control]).astype(np.float32),
                      obs=pd.DataFrame({"group": groups}, index=[str(i) for i in range(len(groups))]))
    both.var_names = [str(g) for g in genes]
    sc.tl.rank_genes_groups(both, "group", groups=["perturbed"], reference="control", method="wilcoxon",
                            n_genes=n, tie_correct=False)
    return [str(g) for g in both.uns["rank_genes_groups"]["names"]["perturbed"][:n]]


def scgen_r2(pred_mean: np.ndarray, true_mean: np.ndarray) -> float:
    """Squared Pearson correlation of per-gene means (scGen, Lotfollahi et al. 2019)."""
    return _pearson(pred_mean, true_mean) ** 2


def rmse(pred_mean: np.ndarray, true_mean: np.ndarray) -> float:
    """Root mean squared error of per-gene means (the mean-level error of Ahlmann-Eltze et al. 2025)."""
    return float(np.sqrt(np.mean((np.asarray(pred_mean, float) - np.asarray(true_mean, float)) ** 2)))


def mae(pred_mean: np.ndarray, true_mean: np.ndarray) -> float:
    """Mean absolute error of per-gene means (cell-eval's ``mae``, a Virtual Cell Challenge metric)."""
    return float(np.mean(np.abs(np.asarray(pred_mean, float) - np.asarray(true_mean, float))))


def pearson_delta(pred_mean: np.ndarray, true_mean: np.ndarray, control_mean: np.ndarray) -> float:
    """Pearson of (predicted - control) with (real - control) per-gene means (cell-eval's ``pearson_delta``)."""
    return _pearson(np.asarray(pred_mean, float) - control_mean, np.asarray(true_mean, float) - control_mean)


def e_distance(x: np.ndarray, y: np.ndarray) -> float:
    """scPerturb's E-distance with squared Euclidean distances (self-pairs excluded)."""
    def within(a):
        d = cdist(a, a, "sqeuclidean")
        return d.sum() / max(len(a) * (len(a) - 1), 1)

    return float(2 * cdist(x, y, "sqeuclidean").mean() - within(x) - within(y))


def discrimination_score(pred_effects: np.ndarray, real_effects: np.ndarray, metric: str = "l1",
                         exclude: Sequence[Sequence[int] | None] | None = None,
                         true_index: Sequence[int] | None = None) -> np.ndarray:
    """Perturbation discrimination score (PDS) as cell-eval 0.8 computes it (Arc Virtual Cell Challenge).

    Row ``q`` of ``real_effects`` is perturbation ``q``'s real mean effect (perturbed mean -
    control mean), row ``p`` of ``pred_effects`` a predicted one, of perturbation
    ``true_index[p]`` (default: ``p``). For each prediction the ``Q`` real effects are ranked by
    their ``metric`` distance (``l1``, ``l2``/``euclidean``, ``cosine``) to it (``np.argsort``,
    ascending; rank 0 = nearest); the score is ``1 - rank / Q``: 1 when the true perturbation
    is the nearest, ``1/Q`` when it is the farthest. ``exclude[p]``: gene columns left out for
    prediction ``p`` (cell-eval drops the knocked-out gene's own column). With the same control
    for prediction and truth this ranks the real perturbed means by distance to the predicted mean.
    """
    from sklearn.metrics import pairwise_distances

    pred_effects, real_effects = np.atleast_2d(np.asarray(pred_effects, float)), np.asarray(real_effects, float)
    if true_index is None:
        if pred_effects.shape != real_effects.shape:
            raise ValueError(f"pred_effects and real_effects must both be (perturbations, genes); got "
                             f"{pred_effects.shape} and {real_effects.shape} (or give true_index)")
        true_index = range(len(pred_effects))
    true_index = [int(i) for i in true_index]
    if len(true_index) != len(pred_effects) or real_effects.ndim != 2 \
            or real_effects.shape[1] != pred_effects.shape[1]:
        raise ValueError(f"shapes do not match: pred {pred_effects.shape}, real {real_effects.shape}, "
                         f"{len(true_index)} true indices")
    metric = {"l1": "manhattan", "l2": "euclidean"}.get(metric, metric)
    n = len(real_effects)
    out = np.empty(len(pred_effects))
    for p, q in enumerate(true_index):
        keep = np.ones(pred_effects.shape[1], bool)
        if exclude is not None and exclude[p] is not None:
            keep[np.asarray(exclude[p], int)] = False
        d = pairwise_distances(real_effects[:, keep], pred_effects[p, keep].reshape(1, -1), metric=metric).ravel()
        rank = int(np.flatnonzero(np.argsort(d) == q)[0])
        out[p] = 1.0 - rank / n
    return out


def perturbation_metrics(pred: np.ndarray, true: np.ndarray, control: np.ndarray, genes, degs: list[str],
                         project=None) -> dict:
    """Every metric of the module docstring for one group. ``degs``: genes ranked by DEG score
    (at least 100, or all genes where fewer); ``project``: a function to PCA scores (fitted on
    real cells) for the distribution distances."""
    from sklearn.metrics import r2_score

    index = {str(g): i for i, g in enumerate(genes)}
    idx = np.array([index[g] for g in degs])
    pm, tm, cm = pred.mean(0), true.mean(0), control.mean(0)
    out = {"scgen_r2_all": scgen_r2(pm, tm), "scgen_r2_top100": scgen_r2(pm[idx[:100]], tm[idx[:100]]),
           "r2_top50": float(r2_score(tm[idx[:50]], pm[idx[:50]])),
           "pearson_delta_all": _pearson(pm - cm, tm - cm),
           "pearson_delta_top20": _pearson(pm[idx[:20]] - cm[idx[:20]], tm[idx[:20]] - cm[idx[:20]]),
           "mse_top20": float(np.mean((pm[idx[:20]] - tm[idx[:20]]) ** 2)),
           "rmse_all": rmse(pm, tm), "mae_all": mae(pm, tm)}
    if project is not None:
        pp, tp = project(pred), project(true)
        out["e_distance"] = e_distance(pp, tp)
        out["mmd"] = mmd_rbf(tp, pp)
    return out


# -- baselines: numpy cores -----------------------------------------------------------------------

def no_change(control: np.ndarray) -> np.ndarray:
    """No change: the context's own control cells (the floor every field benchmark reports)."""
    return np.array(control, copy=True)


def mean_shift(control: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    """Mean shift (scGen's "mean" baseline): control cells plus the mean of the per-context deltas
    (perturbed mean - control mean) of the same perturbation in other contexts. Not clipped, so
    its means are exactly control + delta."""
    return control + np.mean(deltas, axis=0)


def cell_mean(control: np.ndarray, perturbed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cell mean / "perturbed mean" (the Virtual Cell Challenge's cell-mean baseline): control
    cells plus the mean of all other perturbed cells minus the mean of the controls they were
    measured against; the baseline for an unseen perturbation."""
    return control + (np.mean(perturbed, axis=0) - np.mean(reference, axis=0))


def additive(control: np.ndarray, single_deltas: list[np.ndarray]) -> np.ndarray:
    """Additive (the combination baseline of GEARS / Norman et al. 2019): control cells plus the
    sum of the single perturbations' deltas (``A+B`` -> ``dA + dB``)."""
    return control + np.sum(single_deltas, axis=0)


def interpolate_in_time(times: Sequence[float], means: np.ndarray, t: float) -> np.ndarray:
    """Linear interpolation of per-time mean expression at ``t`` between the flanking measured times;
    a measured time is matched to float32 precision (a file's float32 day 0.7 is 0.699999988)."""
    times = np.asarray(times, float)
    order = np.argsort(times)
    times, means = times[order], np.asarray(means, float)[order]
    at = np.flatnonzero(times.astype(np.float32) == np.float32(t))
    if len(at):
        return means[int(at[0])].copy()
    if t < times[0] or t > times[-1]:
        raise ValueError(f"time {t:g} lies outside the measured times [{', '.join(f'{v:g}' for v in times)}]; no "
                         f"flanking times to interpolate between")
    hi = int(np.searchsorted(times, t))
    lo = hi - 1
    w = (t - times[lo]) / (times[hi] - times[lo])
    return (1 - w) * means[lo] + w * means[hi]


def linear_in_time(control: np.ndarray, times: Sequence[float], means: np.ndarray, t: float) -> np.ndarray:
    """Linear in time (the time-course baseline of Klein et al.-style held-out-day tasks): control
    cells shifted so their mean is the interpolation at ``t`` between the flanking measured days."""
    return control + (interpolate_in_time(times, means, t) - np.mean(control, axis=0))


def time_value(key: str, value) -> float:
    """A time as a number: ``4``, ``"4"`` or a day's label (``"day4"``, ``"D4"``, Klein's ``"d4"``,
    :func:`number_text`); anything else is a ValueError naming ``key``."""
    try:
        return float(number_text(value))
    except ValueError:
        raise ValueError(f"{key}={value!r} is no time: a number, or a day's label such as 'day4'") from None


def _times(adata, key: str, what: str) -> np.ndarray:
    """``obs[key]`` of ``adata`` as numbers (:func:`time_value`), a ValueError naming ``what`` else."""
    labels = _labels(adata, key)
    distinct, index = np.unique(labels, return_inverse=True)
    try:
        return np.array([time_value(key, d) for d in distinct], dtype=np.float64)[index.ravel()]
    except ValueError as error:
        raise ValueError(f"obs[{key!r}] of the {what} cells: {error}") from None


def _linear_in_time_by_context(train, control, xc: np.ndarray, t: float, time_key: str, context_key) -> np.ndarray:
    """:func:`linear_in_time` for each context of the ``control`` cells (``context_key``: a batch,
    a cell line) from the training cells of that context, so that no context is moved toward
    another's baseline; a context whose training cells do not flank ``t`` takes the change from
    the control cells' own time to ``t`` that the contexts flanking both measured (with no time
    on the control cells, or no such context: every training cell pooled)."""
    times, xt = _times(train, time_key, "training"), _x(train)
    ctx_t, ctx_c = _contexts(train, context_key), _contexts(control, context_key)

    def means(rows):
        at = np.unique(times[rows])
        return at, np.stack([xt[rows & (times == u)].mean(0) for u in at])

    def flanks(rows, *ts):
        return rows.any() and all(times[rows].min() <= v <= times[rows].max() for v in ts)

    pred = np.empty_like(xc)
    for c in dict.fromkeys(ctx_c):
        rows = ctx_c == c
        if flanks(ctx_t == c, t):
            pred[rows] = linear_in_time(xc[rows], *means(ctx_t == c), t)
            continue
        t0 = np.unique(_times(control[rows], time_key, "control")) if time_key in control.obs else []
        others = [ctx_t == o for o in dict.fromkeys(ctx_t) if len(t0) == 1 and flanks(ctx_t == o, t, t0[0])]
        if others:
            pred[rows] = xc[rows] + np.mean([interpolate_in_time(*means(o), t) - interpolate_in_time(*means(o), t0[0])
                                             for o in others], axis=0)
        else:
            pred[rows] = linear_in_time(xc[rows], *means(np.ones(len(times), bool)), t)
    return pred


class LinearPerturbationModel:
    """Linear baseline (Ahlmann-Eltze et al. 2025): ridge regression from a perturbation feature
    vector (a multi-hot of single perturbations, optionally with covariate one-hots, or supplied
    features such as gene embeddings) to the mean expression delta against control; predicts a
    new group as its control cells plus the predicted delta.

    ``alpha``: the ridge penalty; ``None`` (the default) chooses it from :data:`RIDGE_ALPHAS` by
    cross-validation over the training groups: with ``groups`` (the perturbation of each row, for
    features that describe perturbations never seen) leaving out each perturbation's rows at
    once, else each row (one (context, perturbation) group; sklearn's exact ``RidgeCV``), so a
    screen whose groups predict one another gets little shrinkage and one whose groups are noise
    gets much. The penalty used: ``alpha_``."""

    def __init__(self, alpha: float | None = None):
        self.alpha = alpha

    def fit(self, features: np.ndarray, deltas: np.ndarray, groups=None) -> "LinearPerturbationModel":
        from sklearn.linear_model import Ridge, RidgeCV

        X, Y = np.asarray(features, float), np.asarray(deltas, float)
        self.alpha_ = self.alpha
        if self.alpha is None and groups is not None:
            self.alpha_ = _left_out_groups_alpha(X, Y, np.asarray(groups))
        elif self.alpha is None:
            self.alpha_ = float(RidgeCV(alphas=RIDGE_ALPHAS, fit_intercept=False).fit(X, Y).alpha_)
        self.model = Ridge(alpha=self.alpha_, fit_intercept=False).fit(X, Y)
        return self

    def predict_delta(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(np.asarray(features, float).reshape(1, -1))[0]

    def predict(self, control: np.ndarray, features: np.ndarray) -> np.ndarray:
        return control + self.predict_delta(features)


def _left_out_groups_alpha(X: np.ndarray, Y: np.ndarray, groups: np.ndarray) -> float:
    """The penalty of :data:`RIDGE_ALPHAS` whose ridge (no intercept) predicts each group's rows of
    ``Y`` best from the other groups' rows (summed squared error; the smallest among ties)."""
    gram, cross = X.T @ X, X.T @ Y
    errors = np.zeros(len(RIDGE_ALPHAS))
    for g in np.unique(groups):
        rows = groups == g
        s, V = np.linalg.eigh(gram - X[rows].T @ X[rows])
        XV, VB = X[rows] @ V, V.T @ (cross - X[rows].T @ Y[rows])
        for i, alpha in enumerate(RIDGE_ALPHAS):
            errors[i] += np.sum((XV @ (VB / (np.maximum(s, 0.0) + alpha)[:, None]) - Y[rows]) ** 2)
    return float(RIDGE_ALPHAS[int(np.argmin(errors))])


def pca_gene_embedding(x: np.ndarray, n_components: int = 10, seed: int = 0) -> np.ndarray:
    """Gene embeddings for the linear baseline on unseen knockouts (Ahlmann-Eltze et al. 2025):
    the genes' loadings on the top principal components of the training cells, ``(genes, k)``."""
    from sklearn.decomposition import PCA

    k = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    return PCA(n_components=k, random_state=seed, svd_solver="full").fit(np.asarray(x, float)).components_.T


def gene_pca_features(train, labels, n_components: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """The linear baseline's features for gene targets (Ahlmann-Eltze et al. 2025): for each of
    ``labels`` that names a gene of ``train`` (an AnnData of log1p expression; by name, by a
    symbol of its ``var``, or case-insensitively), that gene's loadings on the top
    ``n_components`` principal components of ``train``'s cells (:func:`pca_gene_embedding`).
    Labels naming no gene of ``train`` get none."""
    genes = [str(g) for g in train.var_names]
    column = symbol_column(train.var)
    found = resolve_genes(labels, genes, symbol_index(genes, symbols_of(train.var, column, genes)) if column else {})
    if not found:
        return {}
    embedding = pca_gene_embedding(_x(train), n_components, seed)
    index = {g: i for i, g in enumerate(genes)}
    return {label: embedding[index[gene]] for label, gene in found.items()}


# -- baselines over AnnData -----------------------------------------------------------------------

def _x(adata) -> np.ndarray:
    import scipy.sparse as sp

    return (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float64)


def _labels(adata, key: str) -> np.ndarray:
    if key not in adata.obs:
        raise KeyError(f"obs has no column {key!r}; columns: {list(adata.obs.columns)}")
    return adata.obs[key].astype(str).to_numpy()


def control_labels_of(control_label) -> tuple[str, ...]:
    """``"control"`` or ``["ctrl", "control"]`` -> a tuple of labels, the first the canonical one."""
    labels = (control_label,) if isinstance(control_label, str) else tuple(str(c) for c in control_label)
    if not labels:
        raise ValueError("no control label given; give the label(s) of the control cells")
    return labels


def perturbation_labels(adata, key: str, separator: str = "+", control_label="control",
                        numeric: bool | None = None) -> np.ndarray:
    """``obs[key]`` of ``adata`` as canonical labels (:func:`scidiff.data.spec.canonical_label`:
    ``B+A`` and ``A+B`` alike, GEARS' ``A+ctrl`` as ``A``, every control label as the first of
    ``control_label``), so that groups match however a file writes them. ``numeric``: read the
    labels as numbers (default: where the column holds numbers; another file's may)."""
    controls = control_labels_of(control_label)
    distinct, index = np.unique(_labels(adata, key), return_inverse=True)
    if numeric_column(adata, key) if numeric is None else numeric:  # a time or dose: 4, 4.0 and "4" are one label
        numbers = {number_text(c) for c in controls}
        return np.array([controls[0] if number_text(d) in numbers else number_text(d) for d in distinct],
                        dtype=object)[index.ravel()]
    return np.array([canonical_label(d, separator, controls) for d in distinct], dtype=object)[index.ravel()]


def numeric_column(adata, key: str) -> bool:
    """Whether ``obs[key]`` holds numbers (a categorical of numbers too), not labels."""
    import pandas as pd

    col = adata.obs[key]
    dtype = col.cat.categories.dtype if isinstance(col.dtype, pd.CategoricalDtype) else col.dtype
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


DAY_LABEL = re.compile(r"(?:d|day)[\s_]?(\d+\.?\d*|\.\d+)", re.IGNORECASE)  # day4, D4, Klein's d4


def number_text(value) -> str:
    """``4``, ``4.0``, ``"4"`` and a day's label (``"day4"``, ``"D4"``, Klein's ``"d4"``) ->
    ``"4.0"`` (a float's text, as a float column reads), a fraction to float32 precision, as the
    model reads a number (a float32 column's day 2.4 widened to 2.4000000953674316 is ``"2.4"``;
    whole numbers exactly); text that is no number as it is."""
    text = str(value).strip()
    day = DAY_LABEL.fullmatch(text)
    try:
        number = float(day.group(1) if day else text) + 0.0  # -0.0 is 0.0
    except ValueError:
        return str(value)
    if number.is_integer() or not abs(number) < 1e38:  # Entrez IDs as numbers: 100287102 is not 100287104
        return str(number)
    return str(np.float32(number))


def _contexts(adata, context_key: str | None) -> np.ndarray:
    return np.full(adata.n_obs, "all", dtype=object) if context_key is None else _labels(adata, context_key)


def perturbation_deltas(train, perturbation_key: str, *, context_key: str | None = None,
                        control_label="control", separator: str = "+") -> dict[str, list[np.ndarray]]:
    """Per perturbation label (canonical, :func:`perturbation_labels`), the deltas (label mean -
    control mean) of every context of ``train`` (an AnnData of log1p expression) that holds both
    the label and control cells (``control_label``: one label or several)."""
    controls = control_labels_of(control_label)
    control_label = controls[0]
    x, ctx = _x(train), _contexts(train, context_key)
    pert = perturbation_labels(train, perturbation_key, separator, controls)
    out: dict[str, list[np.ndarray]] = {}
    for c in dict.fromkeys(ctx):
        in_c = ctx == c
        ctrl = in_c & (pert == control_label)
        if not ctrl.any():
            continue
        base = x[ctrl].mean(0)
        for label in dict.fromkeys(pert[in_c]):
            if label != control_label:
                out.setdefault(label, []).append(x[in_c & (pert == label)].mean(0) - base)
    return out


def _multi_hot(labels: Sequence[str], vocab: list[str], separator: str) -> np.ndarray:
    f = np.zeros(len(vocab))
    for label in labels:
        for s in label.split(separator):
            f[vocab.index(s)] += 1.0
    return f


def _refuse_perturbed(train, control, key: str | None, control_label, separator: str) -> None:
    """Raise where cells of ``control`` carry, under ``key``, a label with a single perturbation
    that ``train`` holds (a label ``train`` does not know, such as another spelling of control, is
    left to the user)."""
    if key is None or key not in control.obs.columns or key not in train.obs.columns:
        return
    controls = control_labels_of(control_label)
    seen = {p for lab in set(perturbation_labels(train, key, separator, controls)) - {controls[0]}
            for p in lab.split(separator)}
    labels = perturbation_labels(control, key, separator, controls)
    perturbed = [lab if seen & set(lab.split(separator)) else None for lab in labels]
    if any(lab is not None for lab in perturbed):
        raise perturbed_input_error(key, perturbed, controls)


def _at_dose(method: str, train, target: dict, perturbation_key, skip, controls, separator):
    """``(train, target, at)`` for a baseline at a dose: each of the target's numeric covariates
    that ``train`` holds (a dose; those in ``skip``, the context and the time, aside) read as a
    number, and ``train`` cut to its control cells and the cells measured at that value, so that a
    change is the one at the dose asked for, not that pooled over the doses (``at``: the values
    read). A value no perturbed training cell was measured at is a ValueError naming the measured
    ones, as is the control asked for at a value its cells were not measured at (the vehicle at
    100 nM); ``no-change`` leaves ``train`` whole."""
    keys = [k for k in target if k != perturbation_key and k not in skip and k in train.obs.columns
            and numeric_column(train, k)]
    if not keys or perturbation_key not in target or perturbation_key not in train.obs:
        return train, target, {}
    target = {**target, **{k: _number(k, target[k]) for k in keys}}
    control = perturbation_labels(train, perturbation_key, separator, controls) == controls[0]
    asked = canonical_label(target[perturbation_key], separator, controls) == controls[0]
    if method == "no-change" and not asked:
        return train, target, {k: target[k] for k in keys}
    at = control if asked else ~control
    for k in keys:
        values = train.obs[k].astype(float).to_numpy()
        if asked and np.isnan(values[at]).all():  # the control's cells carry no dose
            continue
        if not (at & (values == target[k])).any():
            measured = ", ".join(f"{v:g}" for v in np.unique(values[at & ~np.isnan(values)]))
            if asked:
                raise ValueError(f"{perturbation_key}={target[perturbation_key]!r} is the control, whose training "
                                 f"cells were measured at {k} {measured} only, not {target[k]:g}; leave {k} out")
            raise ValueError(f"{method}: no perturbed training cell at {k}={target[k]:g} ({k} measured: {measured}); "
                             f"a baseline reads the cells measured at the {k} asked for")
        at &= values == target[k]
    return (train if asked else train[control | at]), target, {k: target[k] for k in keys}


def _number(key: str, value) -> float:
    """A numeric covariate's value (a dose: ``100``, ``'1e2'``) as a float, else a ValueError naming it."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number; {key} is a numeric covariate, e.g. {key}=4") from None


def predict_baseline(method: str, train, control, target: Mapping, *, perturbation_key: str | None = None,
                     context_key: str | None = None, control_label="control", time_key: str | None = None,
                     features: Mapping[str, np.ndarray] | None = None, alpha: float | None = None,
                     separator: str = "+"):
    """Predict ``control``'s cells under ``target`` with a baseline; returns an AnnData (one
    predicted cell per control cell, ``obs`` copied with the target written in, the control cells
    in ``layers['control']``), like :func:`scidiff.perturbation.predict_perturbation`.

    ``train`` and ``control``: AnnData (or ``.h5ad`` paths) of log1p-normalised expression on the
    same genes.
    ``target``: e.g. ``{'condition': 'stimulated'}``, ``{'perturbation': 'A+B'}`` or
    ``{'day_num': 4.0}``. Perturbation labels are matched in canonical form
    (:func:`perturbation_labels`: ``B+A`` as ``A+B``, GEARS' ``A+ctrl`` as ``A``, combinations
    split at ``separator``); ``control_label``: the control cells' label, or several.
    ``method`` (see :data:`BASELINES`):

    - ``no-change``: the control cells;
    - ``mean-shift``: + the mean over ``context_key`` values of the target's delta in ``train``;
    - ``cell-mean``: + the mean over contexts of (all perturbed cells but the target's) - control;
    - ``additive``: + the sum of the target's singles' mean-shift deltas (``A+B`` -> ``dA + dB``);
    - ``linear``: with ``time_key``, interpolation in time between the flanking measured times
      (``control`` shifted to the interpolated mean); otherwise ridge from a feature vector to the
      delta, fitted on every (context, perturbation) group of ``train``: the multi-hot of single
      perturbations, or ``features[label]`` (labels without features are left out of the fit);
      its penalty ``alpha``, or chosen by leave-one-group-out cross-validation when ``None``
      (:class:`LinearPerturbationModel`; recorded in ``uns['baseline']['alpha']``).

    A target that is the control itself is the control cells under every method. Cells of
    ``control`` labelled with a perturbation of ``train`` are refused (the error names them). A
    dose in ``target`` (a numeric covariate of ``train`` other than ``context_key`` and
    ``time_key``) reads the training cells measured at it (:func:`_at_dose`; recorded in
    ``uns['baseline']['at']``).
    """
    import anndata as ad
    import pandas as pd

    target = condition_mapping(target, "target")  # "stim" failed letter by letter
    train, control = (read_h5ad(a) if isinstance(a, (str, os.PathLike)) else a for a in (train, control))
    method = method.replace("_", "-")
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {list(BASELINES)}")
    if list(map(str, train.var_names)) != list(map(str, control.var_names)):
        raise ValueError("train and control must hold the same genes in the same order")
    _refuse_perturbed(train, control, perturbation_key, control_label, separator)
    controls = control_labels_of(control_label)
    if perturbation_key is not None and perturbation_key in target \
            and not str(target[perturbation_key]).replace(separator, "").strip():  # not control: nothing asked for
        raise ValueError(f"{perturbation_key}={target[perturbation_key]!r} names no perturbation; give a label, or "
                         f"{controls[0]!r} for the control cells")
    train, target, at = _at_dose(method, train, dict(target), perturbation_key, {context_key, time_key}, controls,
                                 separator)
    if time_key is not None and time_key in target:  # written into obs as the number it was read as
        target[time_key] = time_value(time_key, target[time_key])
    xc = _x(control)
    try:
        pred, fitted = _baseline_x(method, train, control, xc, target, perturbation_key, context_key,
                                   control_label, time_key, features, alpha, separator)
    except ValueError as error:
        if not at:
            raise
        raise ValueError(f"{error} at " + ", ".join(f"{k}={v:g}" for k, v in at.items())) from error
    obs = control.obs.copy()
    for k, v in target.items():
        obs[k] = pd.Categorical([v] * control.n_obs) if isinstance(v, str) else v
    out = ad.AnnData(X=pred.astype(np.float32), obs=obs, var=control.var.copy())  # its gene IDs, types, flags
    out.layers["control"] = xc.astype(np.float32)
    out.uns["baseline"] = {"method": method, "target": {k: (v if isinstance(v, str) else float(v))
                                                         for k, v in target.items()}, "at": at, **fitted}
    return out


def _joined_hint(labels, known, separator: str) -> str:
    """Where one of ``labels`` joins perturbations of ``known`` with another separator than
    ``separator`` (``KLF1|CEBPA`` on ``+`` data, :func:`~scidiff.data.dataset.joined_otherwise`),
    the note that says so; else ``""``."""
    joined = joined_otherwise(labels, known, separator)
    if joined is None:
        return ""
    label, other, parts = joined
    return (f"; {label!r} joins perturbations of the training cells with {other!r}, but combinations are read "
            f"joined with {separator!r}: write {separator.join(parts)!r} (or set the separator, --separator)")


def _baseline_x(method, train, control, xc, target, perturbation_key, context_key, control_label, time_key, features,
                alpha, separator) -> np.ndarray:
    """The ``control`` cells (their expression ``xc``) moved by the baseline ``method`` (:func:`predict_baseline`),
    and what was fitted for it (the linear ridge's ``{'alpha': penalty}``, else ``{}``)."""
    if method == "no-change":
        pred = no_change(xc)
    elif method == "linear" and time_key is not None:
        if time_key not in target:
            raise ValueError(f"target has no {time_key!r}: {dict(target)}")
        pred = _linear_in_time_by_context(train, control, xc, time_value(time_key, target[time_key]), time_key,
                                          context_key)
    else:
        if perturbation_key is None or perturbation_key not in target:
            raise ValueError(f"{method} needs perturbation_key and a target for it; got {perturbation_key!r}, "
                             f"{dict(target)}")
        controls = control_labels_of(control_label)
        label = canonical_label(target[perturbation_key], separator, controls)
        if perturbation_key in train.obs.columns and numeric_column(train, perturbation_key):  # as the labels read
            number = number_text(target[perturbation_key])
            label = controls[0] if number in {number_text(c) for c in controls} else number
        deltas = perturbation_deltas(train, perturbation_key, context_key=context_key, control_label=controls,
                                     separator=separator) if method != "cell-mean" else {}
        if label == controls[0]:  # the control itself, under every baseline
            pred = no_change(xc)
        elif method == "mean-shift":
            if label not in deltas:
                raise ValueError(f"mean-shift: {label!r} has no training cells beside controls of the same context"
                                 + _joined_hint([label], {s for lab in deltas for s in lab.split(separator)},
                                                separator))
            pred = mean_shift(xc, deltas[label])
        elif method == "additive":
            singles = label.split(separator)
            missing = [s for s in singles if s not in deltas]
            if missing:
                singles_seen = {s for lab in deltas for s in lab.split(separator)}
                raise ValueError(f"additive: single perturbations without training cells: {missing}"
                                 + _joined_hint(missing, singles_seen, separator))
            pred = additive(xc, [np.mean(deltas[s], axis=0) for s in singles])
        elif method == "cell-mean":
            x, ctx = _x(train), _contexts(train, context_key)
            pert = perturbation_labels(train, perturbation_key, separator, controls)
            per_ctx = []
            for c in dict.fromkeys(ctx):
                in_c = ctx == c
                others = in_c & (pert != controls[0]) & (pert != label)
                ctrl = in_c & (pert == controls[0])
                if others.any() and ctrl.any():
                    per_ctx.append(x[others].mean(0) - x[ctrl].mean(0))
            if not per_ctx:
                raise ValueError(f"cell-mean: no perturbed cells other than {label!r} in train")
            pred = xc + np.mean(per_ctx, axis=0)
        else:  # linear on features
            labels = [lab for lab, ds in deltas.items() for _ in ds]
            ys = [d for ds in deltas.values() for d in ds]
            if features is None:
                vocab = sorted({s for lab in deltas for s in lab.split(separator)})
                unknown = [s for s in label.split(separator) if s not in vocab]
                if unknown:
                    raise ValueError(f"linear: single perturbations unseen in train: {unknown} (a multi-hot "
                                     f"has no column for them; supply features)")
                feats = [_multi_hot([lab], vocab, separator) for lab in labels]
                f_target = _multi_hot([label], vocab, separator)
            else:
                if label not in features:
                    raise ValueError(f"linear: no features for {label!r}")
                keep = [i for i, lab in enumerate(labels) if lab in features]
                if not keep:
                    raise ValueError("linear: no training perturbation has features")
                feats = [np.asarray(features[labels[i]], float) for i in keep]
                ys = [ys[i] for i in keep]
                f_target = np.asarray(features[label], float)
                labels = [labels[i] for i in keep]  # the target is unseen: cross-validated by perturbation
            model = LinearPerturbationModel(alpha).fit(np.stack(feats), np.stack(ys),
                                                       groups=labels if features is not None else None)
            return model.predict(xc, f_target), {"alpha": model.alpha_}
    return pred, {}
