"""The evaluation verb: generated cells scored against real ones, written as a report folder."""
from __future__ import annotations

import json
import os
import time

import anndata as ad
import numpy as np

from ..data import read_h5ad
from ..data.dataset import _log_expression
from ..data.io import atomic_path
from ..data.preprocess import dense, gene_columns
from ..evaluation import evaluate_generation_quality
from ..evaluation.plots import report_plots


def log_expression_of(adata: ad.AnnData, genes) -> np.ndarray:
    """The log1p-normalised expression of ``genes`` in ``adata`` (counts normalised to 10,000)."""
    matrix, var_names, _, _ = _log_expression(adata, None, False, "auto", 1e4)
    return dense(matrix[:, gene_columns(var_names, genes)])


def evaluate_files(real, generated, out_dir, groupby: str | None = None, plots: bool = True) -> dict:
    """Score generated cells against real ones on the generated file's genes; write
    ``metrics.json`` and the report plots into ``out_dir``."""
    real_ad = real if isinstance(real, ad.AnnData) else read_h5ad(real)
    gen_ad = generated if isinstance(generated, ad.AnnData) else read_h5ad(generated)
    genes = [str(g) for g in gen_ad.var_names]
    missing = [g for g in genes if g not in set(map(str, real_ad.var_names))]
    if missing:
        raise KeyError(f"{len(missing)} genes of the generated file are not in the real file: {missing[:20]}")
    real_x, gen_x = log_expression_of(real_ad, genes), log_expression_of(gen_ad, genes)
    labels = {}
    if groupby:
        for name, a in (("real", real_ad), ("generated", gen_ad)):
            if groupby not in a.obs:
                raise KeyError(f"obs key {groupby!r} is not in the {name} file; available obs keys: {list(a.obs.columns)}")
        labels = {"cell_types": real_ad.obs[groupby].astype(str).to_numpy(),
                  "generated_cell_types": gen_ad.obs[groupby].astype(str).to_numpy()}
    t0 = time.perf_counter()
    metrics = evaluate_generation_quality(real_x, gen_x, **labels)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        metrics["plots"] = [os.path.basename(p) for p in report_plots(real_x, gen_x, out_dir)]
    atomic_path(os.path.join(out_dir, "metrics.json"),
                lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=1, default=float)))
    return metrics
