"""Adapter to cell-eval, the Arc Institute's evaluator of the Virtual Cell Challenge (PyPI
``cell-eval``, read against 0.8.2): scores predicted against real cells per perturbation and
scores one prediction against a baseline prediction, as the challenge does.

cell-eval is optional (``pip install 'scidiff[celleval]'``) and imported only when used.

- :func:`run_cell_eval` builds cell-eval's ``MetricsEvaluator`` on a predicted and a real
  AnnData that share a perturbation column and a control label, and returns its per-perturbation
  metrics (by default its "minimal" profile: ``pearson_delta``, ``mse``, ``mae``,
  ``discrimination_score_l1``, ``overlap_at_N``, ``precision_at_N``, ``de_nsig_counts``).
  Differential expression is cell-eval's own (pdex: Mann-Whitney against the control, FDR 0.05).
  The discrimination score ranks a perturbation among the others of the same call, so it is left
  out when a call holds one perturbation (it would be 1 by construction). Overlap and precision
  of the DE genes are reported only where the real data has power: at least ``min_de_genes``
  significant real DE genes (NaN otherwise; cell-eval itself would report 0).
- :func:`cell_eval_score` is cell-eval's ``score_agg_metrics``: each metric's mean normalised
  against the baseline's (``1 - user/base`` for errors, ``(user - base)/(1 - base)`` for
  scores), clipped at 0, and their average (``avg_score``).

cell-eval refuses negative values as log1p input, so negative predicted values (a mean shift
can push a gene below zero) are clipped at 0 before it sees them; the share clipped is reported.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

INSTALL_HINT = "pip install 'scidiff[celleval]'"
MINIMAL_METRICS = ("pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "precision_at_N",
                   "de_nsig_counts")
RANK_METRICS = ("discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine")


def _require_cell_eval():
    try:
        import cell_eval
    except ImportError as err:
        raise ImportError(f"scidiff.evaluation.cell_eval needs the optional package cell-eval: {INSTALL_HINT}") \
            from err
    return cell_eval


@dataclass
class CellEvalResult:
    """cell-eval's per-perturbation metrics (``per_perturbation[pert][metric]``), their means over
    perturbations (NaNs skipped), and what was done to the input."""

    per_perturbation: dict[str, dict[str, float]]
    mean: dict[str, float]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"per_perturbation": self.per_perturbation, "mean": self.mean, "info": self.info}

    @staticmethod
    def concat(results: dict[str, "CellEvalResult"], sep: str = "/") -> "CellEvalResult":
        """One result over several calls (e.g. folds): perturbations keyed ``<call><sep><pert>``."""
        per = {f"{k}{sep}{p}": v for k, r in results.items() for p, v in r.per_perturbation.items()}
        return CellEvalResult(per, _means(per), {"parts": {k: r.info for k, r in results.items()}})


def _means(per: dict[str, dict[str, float]]) -> dict[str, float]:
    metrics = list(dict.fromkeys(m for row in per.values() for m in row))
    out = {}
    for m in metrics:
        vals = [row[m] for row in per.values() if m in row and row[m] is not None and not math.isnan(row[m])]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    return out


def _frame(adata, pert_col: str, clip: bool):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = np.asarray(x, dtype=np.float32)
    negative = float((x < 0).mean()) if x.size else 0.0
    if clip and negative:
        x = np.maximum(x, 0)
    out = ad.AnnData(X=x, obs=pd.DataFrame({pert_col: adata.obs[pert_col].astype(str).to_numpy()},
                                           index=[f"c{i}" for i in range(adata.n_obs)]))
    out.var_names = [str(g) for g in adata.var_names]
    return out, negative


def run_cell_eval(pred, real, pert_col: str, control_label: str, *, metrics=MINIMAL_METRICS,
                  min_de_genes: int = 10, num_threads: int = 1) -> CellEvalResult:
    """Run cell-eval's evaluator on ``pred`` against ``real`` (AnnData of log1p-normalised
    expression, same genes in the same order, ``obs[pert_col]`` holding the perturbation with
    ``control_label`` for the control cells; both must hold the same perturbations and control
    cells, normally the same real control cells). Returns the per-perturbation metrics."""
    _require_cell_eval()
    from cell_eval import MetricPipeline, MetricsEvaluator

    if list(map(str, pred.var_names)) != list(map(str, real.var_names)):
        raise ValueError("pred and real must hold the same genes in the same order")
    pred_ad, negative = _frame(pred, pert_col, clip=True)
    real_ad, real_negative = _frame(real, pert_col, clip=False)
    if real_negative:
        raise ValueError("real holds negative values; cell-eval expects log1p-normalised expression")
    perts = sorted(set(real_ad.obs[pert_col]) - {control_label})
    if sorted(set(pred_ad.obs[pert_col]) - {control_label}) != perts:
        raise ValueError(f"pred and real must hold the same perturbations; real: {perts}, pred: "
                         f"{sorted(set(pred_ad.obs[pert_col]) - {control_label})}")
    for name, a in (("pred", pred_ad), ("real", real_ad)):
        if control_label not in set(a.obs[pert_col]):
            raise ValueError(f"{name} has no control cells ({pert_col} == {control_label!r})")
    metrics = list(metrics)
    if len(perts) < 2:
        metrics = [m for m in metrics if m not in RANK_METRICS]
    wants_de = any(m.startswith(("overlap", "precision", "de_", "pr_auc", "roc_auc")) for m in metrics)
    if wants_de and "de_nsig_counts" not in metrics:
        metrics.append("de_nsig_counts")
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = MetricsEvaluator(pred_ad, real_ad, control_pert=control_label, pert_col=pert_col,
                                     num_threads=num_threads, outdir=os.path.join(tmp, "out"), skip_de=not wants_de)
        pipeline = MetricPipeline(profile=None, break_on_error=True)
        pipeline.add_metrics(metrics)
        pipeline.compute_de_metrics(evaluator.de_comparison)
        pipeline.compute_anndata_metrics(evaluator.anndata_pair)
        table = pipeline.get_results()
    per: dict[str, dict[str, float]] = {}
    for row in table.iter_rows(named=True):
        p = str(row.pop("perturbation"))
        vals = {k: (float("nan") if v is None else float(v)) for k, v in row.items()}
        n_sig = vals.get("de_nsig_counts_real")
        if n_sig is not None and not n_sig >= min_de_genes:
            for k in vals:
                if k.startswith(("overlap_at", "precision_at")):
                    vals[k] = float("nan")
        per[p] = vals
    info = {"cell_eval_version": _version(), "metrics": metrics, "min_de_genes": min_de_genes,
            "pred_negative_fraction_clipped": negative, "n_perturbations": len(perts)}
    return CellEvalResult(per, _means(per), info)


def cell_eval_version() -> str:
    """The installed cell-eval's version."""
    from importlib.metadata import version

    return version("cell-eval")


_version = cell_eval_version


def cell_eval_score(result: CellEvalResult, baseline: CellEvalResult) -> dict[str, float]:
    """cell-eval's ``score_agg_metrics`` of ``result`` against ``baseline`` (the Virtual Cell
    Challenge score): per metric, the mean over perturbations normalised against the baseline's
    and clipped at 0; ``avg_score`` their mean. Only metrics both results hold are scored."""
    _require_cell_eval()
    import polars as pl
    from cell_eval import metrics_registry, score_agg_metrics

    known = set(metrics_registry.list_metrics())
    cols = [m for m in result.mean if m in baseline.mean and m in known]
    if not cols:
        raise ValueError("the two results share no metric cell-eval can score")

    def agg(r: CellEvalResult) -> pl.DataFrame:
        rows = {m: [None if (v := row.get(m)) is None or math.isnan(v) else v for row in r.per_perturbation.values()]
                for m in cols}
        return pl.DataFrame(rows, schema={m: pl.Float64 for m in cols}).describe()

    table = score_agg_metrics(agg(result), agg(baseline))
    return {str(m): float(v) for m, v in zip(table["metric"], table["from_baseline"])}
