"""Distribution metrics between real and generated cells.

All distances are computed in a PCA space fitted on real cells only (never on generated ones).
Cells a PCA was fitted on sit further out along its axes than new cells do (in-sample PC scores
are inflated when cells are few and genes many: 600 Kang cells against 600 others score a
classifier AUC of 0.88 in PCs fitted on the first 600), so the real cells are cross-fitted: the
PCA is fitted on one half of them, the other half is scored against the generated cells, the
halves swap and the two results are averaged. Real and generated cells are then both new to the
PCA. The metrics:

- RBF-MMD (Gretton et al. 2012), a sum of Gaussian kernels at bandwidths around the median
  real-real distance, unbiased estimator;
- energy distance (Székely & Rizzo 2013);
- Fréchet distance between Gaussians fitted to each set (the "FID" of image generation,
  Heusel et al. 2017, on PCs instead of Inception features);
- a cross-validated real-vs-generated classifier AUC (0.5 = indistinguishable);
- gene-level: Pearson of per-gene means and variances, and preservation of the gene-gene
  correlation matrix (Pearson between the two matrices' upper triangles);
- in expression, not PCs, the properties a simulator of counts is judged on
  (:func:`measurement_properties`).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from scipy.stats import ks_2samp


def _dense(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)


def fit_pca(real: np.ndarray, n_components: int = 30, seed: int = 0):
    """PCA fitted on ``real``; returns a function mapping cells to PC scores."""
    from sklearn.decomposition import PCA

    n_components = int(min(n_components, real.shape[0] - 1, real.shape[1]))
    pca = PCA(n_components=n_components, random_state=seed, svd_solver="full").fit(real)
    return pca.transform


def _median_sq_dist(a: np.ndarray, max_n: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    if len(a) > max_n:
        a = a[rng.choice(len(a), max_n, replace=False)]
    d = cdist(a, a, "sqeuclidean")
    return float(np.median(d[np.triu_indices(len(a), 1)])) if len(a) > 1 else 1.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None,
            scales=(0.25, 0.5, 1.0, 2.0, 4.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels ``exp(-d^2 / (s * h))``, ``h`` the median
    squared distance among ``x`` unless given; NaN where either set has fewer than two cells."""
    if len(x) < 2 or len(y) < 2:  # the unbiased estimator needs two cells a side
        return float("nan")
    h = bandwidth or _median_sq_dist(x)
    dxx, dyy, dxy = cdist(x, x, "sqeuclidean"), cdist(y, y, "sqeuclidean"), cdist(x, y, "sqeuclidean")
    m, n = len(x), len(y)
    total = 0.0
    for s in scales:
        kxx, kyy, kxy = np.exp(-dxx / (s * h)), np.exp(-dyy / (s * h)), np.exp(-dxy / (s * h))
        total += ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                  - 2 * kxy.mean())
    return float(total / len(scales))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic)."""
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))``."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = scipy.linalg.sqrtm(s_x @ s_y)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * covmean))


def classifier_scores(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, repeats: int = 1,
                      rng: np.random.Generator | None = None):
    """Out-of-fold scores of a random forest telling ``x`` (label 0) from ``y`` (label 1) on
    equal-sized sets: ``(labels [2n], [scores [2n] per draw])``. Each of the ``repeats`` draws
    subsamples the larger set anew (from ``rng``, by default seeded with ``seed``) and uses
    ``seed + draw`` for its folds and its forest."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed) if rng is None else rng
    n = min(len(x), len(y))
    labels = np.r_[np.zeros(n), np.ones(n)]
    folds = max(2, min(folds, n))
    runs = []
    for r in range(repeats):
        data = np.vstack([x[rng.choice(len(x), n, replace=False)], y[rng.choice(len(y), n, replace=False)]])
        scores = np.zeros(2 * n)
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed + r).split(data, labels):
            clf = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=seed + r, n_jobs=1)
            scores[test] = clf.fit(data[train], labels[train]).predict_proba(data[test])[:, 1]
        runs.append(scores)
    return labels, runs


def classifier_auc(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, repeats: int = 1) -> float:
    """Cross-validated ROC AUC of a random forest telling ``x`` from ``y``, on equal-sized sets
    (the larger one is subsampled), averaged over ``repeats`` draws of the subsample, the folds and
    the forest (:func:`classifier_scores`). 0.5 means indistinguishable. With tens of cells a
    set one draw is noisy (the same real cells scored 0.52-0.60 over five seeds, averaged over
    Kang's 14 groups); ten draws bring that spread down about threefold."""
    from sklearn.metrics import roc_auc_score

    if min(len(x), len(y)) < 2:
        return float("nan")
    labels, runs = classifier_scores(x, y, folds, seed, repeats)
    return float(np.mean([roc_auc_score(labels, scores) for scores in runs]))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def gene_correlation_preservation(real: np.ndarray, generated: np.ndarray, max_genes: int = 500) -> float:
    """Pearson between the upper triangles of the gene-gene correlation matrices of the
    ``max_genes`` most variable real genes."""
    var = real.var(0)
    idx = np.argsort(-var)[:max_genes]
    idx = idx[(var[idx] > 0) & (generated[:, idx].var(0) > 0)]
    if len(idx) < 3:
        return float("nan")
    cr, cg = np.corrcoef(real[:, idx], rowvar=False), np.corrcoef(generated[:, idx], rowvar=False)
    iu = np.triu_indices(len(idx), 1)
    return _pearson(cr[iu], cg[iu])


def measurement_properties(real, generated, detected: float = 1e-5) -> dict[str, float]:
    """How far generated cells' measured properties lie from real cells', as SimBench scores
    simulators of single-cell data (Cao et al. 2021, Nat. Commun. 12:6911): per property, the
    two-sample Kolmogorov-Smirnov statistic (0 = the same distribution, 1 = disjoint) between its
    values in the real and in the generated cells. Per cell: the number of genes detected (above
    ``detected``) and the total expression; per gene: the fraction of cells detecting it, its mean
    and its variance. Expression (log1p), cells x the same genes."""
    real, generated = _dense(real), _dense(generated)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real cells have {real.shape[1]} genes and generated cells {generated.shape[1]}")

    def properties(x):
        on = x > detected
        return {"detected_per_cell": on.sum(1), "total_per_cell": x.sum(1), "detection_per_gene": on.mean(0),
                "mean_per_gene": x.mean(0), "variance_per_gene": x.var(0)}

    a, b = properties(real), properties(generated)
    return {k: float(ks_2samp(a[k], b[k]).statistic) for k in a}


def distribution_metrics(real_pcs: np.ndarray, gen_pcs: np.ndarray, seed: int = 0, auc_repeats: int = 1) -> dict:
    """MMD, energy distance, Fréchet distance and classifier AUC (averaged over ``auc_repeats``
    draws) between two PC-score sets."""
    return {"mmd": mmd_rbf(real_pcs, gen_pcs), "energy_distance": energy_distance(real_pcs, gen_pcs),
            "fid": frechet_distance(real_pcs, gen_pcs) if min(len(real_pcs), len(gen_pcs)) > 2 else float("nan"),
            "classifier_auc": classifier_auc(real_pcs, gen_pcs, seed=seed, repeats=auc_repeats)}


def _halves(n: int, labels, seed: int):
    """Two disjoint halves of ``range(n)``, stratified by ``labels`` when given."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n) if labels is None else labels
    first = np.zeros(n, bool)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        first[idx[: len(idx) // 2]] = True
    return np.flatnonzero(first), np.flatnonzero(~first)


def _mean_of(dicts: list[dict]) -> dict:
    out = {}
    for k in dicts[0]:
        vals = [d[k] for d in dicts if k in d]
        out[k] = _mean_of(vals) if isinstance(vals[0], dict) else (
            int(sum(vals)) if isinstance(vals[0], (int, np.integer)) else float(np.nanmean(vals)))
    return out


def evaluate_generation_quality(real_data, generated_data, cell_types=None, generated_cell_types=None,
                                n_pcs: int = 30, seed: int = 0, auc_repeats: int = 1) -> dict:
    """Score generated cells against real ones (same genes, same log-normalised space).

    Returns ``mmd``, ``energy_distance``, ``fid``, ``classifier_auc`` (in ``n_pcs`` PCs of real
    cells, cross-fitted over two halves of the real cells; see the module notes),
    ``mean_correlation``, ``var_correlation`` (per-gene Pearson over all cells),
    ``gene_correlation`` and ``measurement`` (:func:`measurement_properties`: how far the genes
    detected and the total expression per cell, and each gene's detection, mean and variance, lie
    from the real cells'). With ``cell_types`` (labels of the real cells) and
    ``generated_cell_types``, also ``per_cell_type`` with the same distances per label; when the
    generated cells are one per real cell (same count), ``generated_cell_types`` defaults to
    ``cell_types``; ``per_cell_type_skipped`` then names each generated label left out of it and
    why (not a label of the real cells, or too few cells). Each classifier AUC averages
    ``auc_repeats`` draws of the subsample, folds and forest (each draw fits 5 forests: 10 draws
    steady a group of tens of cells at ten times the cost).
    """
    real, gen = _dense(real_data), _dense(generated_data)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"real and generated data need the same genes: shapes {real.shape} vs {gen.shape}")
    if len(real) < 6 or len(gen) < 3:
        raise ValueError(f"need at least 6 real and 3 generated cells; got {len(real)} real and {len(gen)} generated")
    ct_r = ct_g = None
    if cell_types is not None:
        if generated_cell_types is None:
            if len(gen) != len(real):
                raise ValueError("cell_types labels the real cells; pass generated_cell_types for the generated ones")
            generated_cell_types = cell_types
        ct_r, ct_g = np.asarray(cell_types).astype(str), np.asarray(generated_cell_types).astype(str)
        if len(ct_r) != len(real) or len(ct_g) != len(gen):
            raise ValueError("cell_types / generated_cell_types must have one label per cell")
    folds = []
    for fit, score in (lambda h: (h, h[::-1]))(_halves(len(real), ct_r, seed)):
        project = fit_pca(real[fit], n_pcs, seed)
        rp, gp = project(real[score]), project(gen)
        fold = distribution_metrics(rp, gp, seed, auc_repeats)
        fold["n_pcs"] = rp.shape[1]
        if ct_r is not None:
            per = {}
            for label in sorted(set(ct_r) & set(ct_g)):
                r, g = ct_r[score] == label, ct_g == label
                if r.sum() >= 3 and g.sum() >= 3:
                    per[label] = distribution_metrics(rp[r], gp[g], seed, auc_repeats)
            fold["per_cell_type"] = per
        folds.append(fold)
    out = {k: v for k, v in _mean_of(folds).items() if k != "per_cell_type"}
    out.update({"mean_correlation": _pearson(real.mean(0), gen.mean(0)),
                "var_correlation": _pearson(real.var(0), gen.var(0)),
                "gene_correlation": gene_correlation_preservation(real, gen),
                "measurement": measurement_properties(real, gen),
                "n_real": len(real), "n_generated": len(gen), "n_pcs": folds[0]["n_pcs"]})
    if ct_r is not None:
        labels = sorted(set(folds[0]["per_cell_type"]) & set(folds[1]["per_cell_type"]))
        per = {}
        for label in labels:
            m = _mean_of([f["per_cell_type"][label] for f in folds])
            r, g = ct_r == label, ct_g == label
            m.update({"mean_correlation": _pearson(real[r].mean(0), gen[g].mean(0)),
                      "measurement": measurement_properties(real[r], gen[g]),
                      "n_real": int(r.sum()), "n_generated": int(g.sum())})
            per[label] = m
        out["per_cell_type"] = per
        out["per_cell_type_skipped"] = _skipped_labels(ct_r, ct_g, per)
    return out


def _skipped_labels(ct_r: np.ndarray, ct_g: np.ndarray, scored) -> dict[str, str]:
    """Each label of the generated cells that ``per_cell_type`` leaves out, and why (so that a
    label the two files spell differently, or a group too small to score, is not dropped in silence)."""
    real_labels, out = set(ct_r), {}
    for label in sorted(set(ct_g) - set(scored)):
        label = str(label)
        if label not in real_labels:
            out[label] = "not among the real cells' labels"
        else:
            out[label] = (f"too few cells to score: {int((ct_g == label).sum())} generated and "
                          f"{int((ct_r == label).sum())} real (at least 3 generated, and 3 real in each half of "
                          f"the real cells)")
    return out
