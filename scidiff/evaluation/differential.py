"""Does generation keep differential expression? Generated vs real log fold changes.

A generator can match each condition's cells and still shrink the difference between conditions
(the attenuation a recent benchmark of single-cell generators found in all of them). Per cell
type: the top differentially expressed genes between two conditions are chosen on reference
cells (Welch's t on log1p expression), and on those genes the generated log fold changes
(difference of mean log1p expression, treated minus control) are compared with the real ones by
the least-squares slope of generated on real (1 = kept, below 1 = attenuated) and Pearson's r.
"""
from __future__ import annotations

import numpy as np


def log_fold_changes(control: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """Per-gene difference of mean log1p expression, ``treated - control`` (cells x genes each)."""
    return np.asarray(treated, np.float64).mean(0) - np.asarray(control, np.float64).mean(0)


def top_de_genes(control: np.ndarray, treated: np.ndarray, n: int = 100) -> np.ndarray:
    """Indices of the ``n`` genes with the largest Welch t statistic (absolute) between the two
    groups of cells (genes that do not vary in either are never chosen)."""
    a, b = np.asarray(control, np.float64), np.asarray(treated, np.float64)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    t = np.where(se > 0, np.abs(b.mean(0) - a.mean(0)) / np.where(se > 0, se, 1.0), -np.inf)
    order = np.argsort(-t, kind="stable")
    return order[:min(n, int(np.isfinite(t).sum()))]


def lfc_agreement(predicted: np.ndarray, real: np.ndarray) -> dict:
    """``{"slope", "pearson"}`` of predicted on real log fold changes (least squares with an
    intercept; NaN where the real ones do not vary)."""
    p, r = np.asarray(predicted, np.float64), np.asarray(real, np.float64)
    if len(r) < 2 or r.std() == 0:
        return {"slope": float("nan"), "pearson": float("nan")}
    slope = float(np.cov(p, r)[0, 1] / r.var(ddof=1))
    pearson = float(np.corrcoef(p, r)[0, 1]) if p.std() > 0 else float("nan")
    return {"slope": slope, "pearson": pearson}


def de_preservation(real_control: np.ndarray, real_treated: np.ndarray, generated: dict, *,
                    reference: tuple | None = None, n_genes: int = 100) -> dict:
    """Slope and Pearson of each generator's log fold changes against the real ones.

    ``real_*``: the real cells the generated ones are scored against (held-out cells);
    ``generated``: name -> ``(control cells, treated cells)``; ``reference``: ``(control,
    treated)`` cells to choose the DE genes on (default: the real ones; pass cells the generators
    were not scored on, e.g. the training cells, to keep the choice independent of the scoring).
    Returns name -> ``{"slope", "pearson"}`` and ``"genes"``: the chosen gene indices."""
    ref_c, ref_t = reference if reference is not None else (real_control, real_treated)
    genes = top_de_genes(ref_c, ref_t, n_genes)
    real = log_fold_changes(real_control[:, genes], real_treated[:, genes])
    out = {name: lfc_agreement(log_fold_changes(c[:, genes], t[:, genes]), real) for name, (c, t) in generated.items()}
    out["genes"] = genes.tolist()
    return out
