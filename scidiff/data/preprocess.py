"""AnnData in: pick the expression matrix, check it, normalise like scanpy, choose genes.

Raw counts are library-size normalised and log-transformed exactly as
``scanpy.pp.normalize_total(target_sum=...)`` followed by ``scanpy.pp.log1p``; log-normalised
input is taken as is. Scaled (z-scored) input is refused with a message that says where the
unscaled values usually are.
"""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .io import read_h5ad  # noqa: F401  (re-exported)


def _name(adata: ad.AnnData) -> str:
    src = adata.uns.get("scidiff_source") if adata.uns is not None else None
    return f"{src!r}" if src else "the AnnData"


def expression_matrix(adata: ad.AnnData, layer: str | None = None, use_raw: bool = False):
    """Return ``(matrix, var_names, where)`` from ``X``, ``layers[layer]`` or ``raw.X``."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{_name(adata)} is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    if use_raw and layer:
        raise ValueError("pass either layer= or use_raw=True, not both")
    if use_raw:
        if adata.raw is None:
            raise KeyError(f"{_name(adata)} has no .raw; layers available: {list(adata.layers)}")
        return adata.raw.X, adata.raw.var_names, "raw.X"
    if layer:
        if layer not in adata.layers:
            raise KeyError(f"layer {layer!r} is not in {_name(adata)}; layers available: "
                           f"{list(adata.layers) or 'none'}")
        return adata.layers[layer], adata.var_names, f"layers[{layer!r}]"
    return adata.X, adata.var_names, "X"


def _values(m) -> np.ndarray:
    return m.data if sp.issparse(m) else np.asarray(m).ravel()


def detect_input(matrix, where: str, input_kind: str = "auto") -> str:
    """Check values and return ``"counts"`` or ``"log1p"``.

    Raises for NaN/inf, for negative values (scaled data, or presented as counts) and for
    non-integers presented as counts.
    """
    if input_kind not in ("auto", "counts", "log1p"):
        raise ValueError(f"input must be 'auto', 'counts' or 'log1p', got {input_kind!r}")
    v = _values(matrix)
    if v.size == 0:
        return "counts" if input_kind == "auto" else input_kind
    finite = np.isfinite(v)
    if not finite.all():
        bad = int((~finite).sum())
        raise ValueError(f"{where} holds {bad} NaN or infinite values; clean them before training")
    vmin = float(v.min())
    if vmin < 0:
        if input_kind == "counts":
            raise ValueError(f"{where} was presented as counts but holds negative values (min {vmin:.3g})")
        raise ValueError(f"{where} holds negative values (min {vmin:.3g}): it looks scaled or "
                         "centred. Pass the unscaled values (use_raw=True / --use-raw, or layer=...)")
    integral = bool(np.all(v == np.round(v)))
    if input_kind == "counts" and not integral:
        raise ValueError(f"{where} was presented as counts but holds non-integer values")
    if input_kind == "auto":
        return "counts" if integral else "log1p"
    return input_kind


def log_normalize(counts, target_sum: float | None = 1e4):
    """``log1p(counts / total * target_sum)`` per cell (scanpy ``normalize_total`` + ``log1p``).

    ``target_sum=None`` uses the median total of cells with counts, as scanpy does. Returns the
    normalised matrix (sparse stays sparse) and the ``target_sum`` used.
    """
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    if target_sum is None:
        target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    factor = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(counts):
        out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        out.data *= np.repeat(factor, np.diff(out.indptr)).astype(np.float32)
        np.log1p(out.data, out=out.data)
        return out, float(target_sum)
    out = np.asarray(counts, dtype=np.float32) * factor[:, None].astype(np.float32)
    return np.log1p(out), float(target_sum)


def select_genes(log_matrix, var_names, genes=None, n_top_genes: int | None = 2000) -> list[str]:
    """A given gene list (checked), or the ``n_top_genes`` highly variable genes by scanpy's
    ``highly_variable_genes(flavor='seurat')`` on log-normalised values, or all genes."""
    var_names = [str(g) for g in var_names]
    if genes is not None:
        genes = [str(g) for g in genes]
        known = set(var_names)
        missing = [g for g in genes if g not in known]
        if missing:
            raise KeyError(f"{len(missing)} requested genes are not in the data: {missing[:20]}")
        if len(set(genes)) != len(genes):
            raise ValueError("the requested gene list has duplicates")
        return genes
    if n_top_genes is None or n_top_genes >= len(var_names):
        return var_names
    import scanpy as sc

    tmp = ad.AnnData(X=log_matrix)
    tmp.var_names = var_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
    mask = tmp.var["highly_variable"].to_numpy()
    return [g for g, m in zip(var_names, mask) if m]


def gene_columns(var_names, genes) -> np.ndarray:
    index = {str(g): i for i, g in enumerate(var_names)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise KeyError(f"{len(missing)} of the model's genes are not in the data: {missing[:20]}")
    return np.fromiter((index[g] for g in genes), dtype=np.int64, count=len(genes))


def dense(m) -> np.ndarray:
    return (m.toarray() if sp.issparse(m) else np.asarray(m)).astype(np.float32, copy=False)
