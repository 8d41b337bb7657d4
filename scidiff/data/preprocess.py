"""AnnData in: pick the expression matrix, check it, normalise like scanpy, choose genes.

Input is classified from its values: raw counts are library-size normalised and log-transformed
exactly as ``scanpy.pp.normalize_total(target_sum=...)`` followed by ``scanpy.pp.log1p``;
log-normalised input is taken as is. Scaled (z-scored) input, all-zero matrices and values that
are neither (TPM, CPM, intensities) are refused with a message that says what to pass instead.
"""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..checks import warn, yes_no
from .gene_symbols import var_of
from .io import read_h5ad  # noqa: F401  (re-exported)
from .validate import check_sparse, check_unique_genes, feature_types, rna_features, rna_mask


def _source(adata: ad.AnnData) -> str | None:
    """The file ``adata`` was read from (``uns['scidiff_source']``), if known."""
    return adata.uns.get("scidiff_source") if adata.uns is not None else None


def _name(adata: ad.AnnData) -> str:
    return f"{_source(adata)!r}" if _source(adata) else "the AnnData"


def expression_matrix(adata: ad.AnnData, layer: str | None = None, use_raw: bool = False):
    """Return ``(matrix, var_names, key)`` from ``X``, ``layers[layer]`` or ``raw.X`` (``key``: where
    it is in the file, ``X``, ``layers/<layer>`` or ``raw/X``), its sparse arrays checked and its
    gene names unique; only its Gene Expression features where var's feature types name others
    (:func:`~scidiff.data.validate.rna_features`: ADTs, guides, hashtags, peaks left out)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{_name(adata)} is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    if use_raw and layer:
        raise ValueError("pass either layer= or use_raw=True, not both")
    if use_raw:
        if adata.raw is None:
            raise KeyError(f"{_name(adata)} has no .raw; layers available: {list(adata.layers)}")
        matrix, var_names, key = adata.raw.X, adata.raw.var_names, "raw/X"
    elif layer:
        if layer not in adata.layers:
            raise KeyError(f"layer {layer!r} is not in {_name(adata)}; layers available: "
                           f"{list(adata.layers) or 'none'}")
        matrix, var_names, key = adata.layers[layer], adata.var_names, f"layers/{layer}"
    else:
        matrix, var_names, key = adata.X, adata.var_names, "X"
    check_sparse(matrix, _name(adata), key, adata.obs_names, var_names)
    every = var_of(adata, use_raw, every_feature=True)
    rna = rna_features(every, f"{key} of {_name(adata)}")  # ADTs, guides, peaks: left out
    if rna is not None:
        matrix, var_names = matrix[:, rna], var_names[rna]
    check_unique_genes(var_names, f"{key} of {_name(adata)}")
    return matrix, var_names, key


def expression_as_x(adata: ad.AnnData, layer: str | None = None, use_raw: bool = False) -> ad.AnnData:
    """``adata`` itself, or an AnnData of its cells whose ``X`` is ``layers[layer]`` or ``.raw``'s
    matrix (with ``.raw``'s genes), the matrix not copied: for readers of ``X``. Errors name the
    file and where the matrix lies in it."""
    use_raw = yes_no("use_raw", use_raw)  # 'no' read raw.X, as any non-empty text is true
    mixed = (types := feature_types(adata.var)) is not None and not rna_mask(types).all()
    if not layer and not use_raw and not mixed:
        return adata
    matrix, _, key = expression_matrix(adata, layer, use_raw)  # RNA features only (ADTs, guides left out)
    # X's own records where X (its RNA) is read (scanpy's log1p base, scidiff's target_sum); a layer's are not X's
    uns = dict(adata.uns) if key == "X" else {k: adata.uns[k] for k in ("log1p",) if k in adata.uns and key == "raw/X"}
    return ad.AnnData(X=matrix, obs=adata.obs, var=var_of(adata, use_raw),
                      uns={**uns, "scidiff_source": f"{_source(adata) or 'the AnnData'} ({key})"})


def spmatrix(m):
    """A scipy sparse array (``csr_array``, as anndata may read ``X``) as the sparse matrix of its
    format, sharing its arrays, for the methods only sparse matrices have (``getnnz``)."""
    return sp.csc_matrix(m) if m.format == "csc" else sp.csr_matrix(m)


def _values(m) -> np.ndarray:
    """The stored values (a sparse matrix's explicit entries, a dense array's all)."""
    if sp.issparse(m):
        return m.data[: m.indptr[-1]] if getattr(m, "format", None) in ("csr", "csc") else m.data
    return np.asarray(m).ravel()


# log1p of library-size normalised counts stays far below this (log1p(1e6) = 13.8; log2(1e6 + 1)
# = 19.9): larger non-integer values are TPM, CPM or intensities, not log-normalised expression.
LOG1P_MAX = 30.0

_INSIST = ("Pass raw counts instead (--layer NAME / layer=..., or --use-raw / use_raw=True), or insist that the "
           "values are log1p-normalised with the config `data: {input: log1p}` / input_kind='log1p'")


class AllZeroError(ValueError):
    """Every cell of the matrix has zero counts."""


def _shape(matrix) -> str:
    shape = getattr(matrix, "shape", None)
    return f"{shape[0]} cells x {shape[1]} genes" if shape is not None and len(shape) == 2 else "the matrix"


def _check_finite(v: np.ndarray, where: str) -> None:
    finite = np.isfinite(v)
    if not finite.all():
        bad = int((~finite).sum())
        raise ValueError(f"{where} holds {bad} NaN or infinite values; remove or replace them first")


def _other(where: str, v: np.ndarray, nonint: np.ndarray) -> ValueError:
    """The error for values that are neither counts nor log1p (TPM, CPM, intensities)."""
    near = bool(np.all(np.abs(v[nonint] - np.round(v[nonint])) < 1e-3))
    hint = "; they are within 1e-3 of integers: if they are counts, round them (np.rint)" if near else ""
    return ValueError(f"{where} holds neither counts nor log1p-normalised values: max {float(v.max()):.6g} with "
                      f"{nonint.mean():.1%} of the nonzero values non-integer (log1p of normalised counts stays "
                      f"below {LOG1P_MAX:g}); it looks like TPM, CPM or raw intensities{hint}. {_INSIST}")


MIN_MEDIAN_GENES = 10  # a median cell with fewer detected genes (or 1% of them) is an empty droplet: unfiltered


def warn_empty_cells(matrix, where: str, names=None, sampled_from: int | None = None) -> None:
    """Warn where training cells carry no expression: a median cell with fewer than
    ``MIN_MEDIAN_GENES`` detected genes, or 1% of the genes where that is fewer (an unfiltered
    droplet matrix, mostly empty barcodes: 1-3 genes each), or cells with none at all.
    ``sampled_from``: the file's cell count where ``matrix`` is a sample."""
    detected = spmatrix(matrix).getnnz(axis=1) if sp.issparse(matrix) else np.count_nonzero(np.asarray(matrix), axis=1)
    of = f"of the {len(detected)} cells sampled from {sampled_from}" if sampled_from else f"of {len(detected)} cells"
    median = float(np.median(detected)) if len(detected) else 0.0
    if median < min(MIN_MEDIAN_GENES, 0.01 * matrix.shape[1]):
        warn(f"{where}: the median cell has {median:g} detected genes ({of}): this looks like an unfiltered "
             f"droplet matrix (mostly empty barcodes, as Cell Ranger's raw_feature_bc_matrix); use the "
             f"filtered matrix, or filter the cells first (`sc.pp.filter_cells(adata, min_genes=200)`)")
        return
    empty = np.flatnonzero(detected == 0)
    if len(empty):
        shown = [str(names[i]) for i in empty[:3]] if names is not None else empty[:3].tolist()
        warn(f"{where}: {len(empty)} {of} have no detected gene (e.g. {shown}); they enter training as "
             f"empty profiles: filter them first (`sc.pp.filter_cells(adata, min_genes=1)`)")


def detect_input(matrix, where: str, input_kind: str = "auto") -> str:
    """Classify the values of ``matrix`` and return ``"counts"`` or ``"log1p"``.

    Refused: NaN/inf; a matrix where every cell is zero; negative values (scaled data, or presented
    as counts); non-integers presented as counts; and, unless ``input_kind="log1p"`` insists,
    non-integer values above :data:`LOG1P_MAX` (TPM, CPM, intensities: neither counts nor log1p)
    and log2(x + 1) values (:func:`common_total`: seen where ``matrix`` holds every gene).
    """
    if input_kind not in ("auto", "counts", "log1p"):
        raise ValueError(f"input must be 'auto', 'counts' or 'log1p', got {input_kind!r}")
    v = _values(matrix)
    _check_finite(v, where)
    v = v[v != 0]
    if v.size == 0:
        raise AllZeroError(f"{where} is all zeros: every cell has zero counts ({_shape(matrix)}); nothing to "
                           "learn from. Check that the expression was written to this matrix (X, a layer or raw)")
    vmin = float(v.min())
    if vmin < 0:
        if input_kind == "counts":
            raise ValueError(f"{where} was presented as counts but holds negative values (min {vmin:.3g})")
        raise ValueError(f"{where} holds negative values (min {vmin:.3g}): it looks scaled or "
                         "centred. Pass the unscaled values (use_raw=True / --use-raw, or layer=...)")
    nonint = v != np.round(v)
    if input_kind == "counts" and nonint.any():
        raise ValueError(f"{where} was presented as counts but holds non-integer values "
                         f"({nonint.mean():.1%} of the nonzero values, max {float(v.max()):.6g})")
    if input_kind != "auto":
        return input_kind
    if not nonint.any():
        return "counts"
    if float(v.max()) > LOG1P_MAX:
        raise _other(where, v, nonint)
    common_total(matrix, where)  # log2(x + 1) refused
    return "log1p"


SAME_TOTAL = 1e-3  # relative spread of the cells' totals under which one normalisation made them all


def _totals(m, scale: float, rows: int) -> np.ndarray:
    """Every cell's total of ``expm1(scale * x)`` in float64, by blocks of ``rows`` cells."""
    def block(b):
        if sp.issparse(b):
            return np.asarray((sp.csr_matrix(b, dtype=np.float64) * scale).expm1().sum(1)).ravel()
        return np.expm1(np.asarray(b, np.float64) * scale).sum(1)

    return np.concatenate([block(m[i:i + rows]) for i in range(0, m.shape[0], rows)]) if m.shape[0] else np.zeros(0)


def common_total(matrix, where: str, rows: int = 4096) -> float | None:
    """The one total all cells of log1p ``matrix`` (dense or sparse) sum back to (``expm1``: its
    normalisation's library size, where it holds every gene it was normalised over), else ``None``.
    A matrix whose totals agree in base 2 instead (log2(x + 1), as limma or Seurat users may write)
    is refused, naming ``where``. Values shifted alike (a mean shift by a constant) keep the totals
    equal too, but move the zeros: ``None`` without a zero or with a negative value, and where
    fewer than half of the cells differ (a mean per group); ``None`` above :data:`LOG1P_MAX`."""
    m = matrix.tocsr() if sp.issparse(matrix) and matrix.format not in ("csr", "csc") else matrix
    n = m.shape[0]
    if len(np.unique(np.asarray(m.sum(1), np.float64))) < max(3, n / 2) or m.min() < 0 or m.max() > LOG1P_MAX:
        return None

    def total(scale):
        t = _totals(m, scale, rows)
        t = t[t > 0]
        return float(np.median(t)) if t.std() <= SAME_TOTAL * t.mean() else None

    if (found := total(1.0)) is not None:
        zeros = m.nnz < np.prod(m.shape) or (m.data == 0).any() if sp.issparse(m) else (np.asarray(m) == 0).any()
        return found if zeros else None
    if (log2 := total(np.log(2))) is not None:
        raise ValueError(f"{where} looks log2-transformed: every cell's 2**x - 1 sums to {log2:,.0f}, not its expm1; "
                         f"scidiff reads log1p (natural log) values: convert it (`adata.X = adata.X * np.log(2)`) "
                         f"or pass its counts")
    return None


def check_log_base(adata: ad.AnnData, key: str, where: str) -> None:
    """Refuse log1p values of ``X`` (or ``.raw``, set after) that scanpy records as taken in another
    base than e (``uns['log1p']['base']``, written by ``sc.pp.log1p(adata, base=2)``): the log2
    check (:func:`common_total`) sees it only where the matrix holds every gene it was normalised
    over, not after subsetting to the highly variable genes. ``key``: where the values were read."""
    record = adata.uns.get("log1p") if key in ("X", "raw/X") else None
    base = record.get("base") if isinstance(record, dict) else None
    try:
        base = None if base is None else float(base)
    except (TypeError, ValueError):
        return
    if base is not None and base > 0 and abs(np.log(base) - 1) > 1e-6:
        raise ValueError(f"{where} is log-transformed in base {base:g} (uns['log1p']['base'], as "
                         f"`sc.pp.log1p(adata, base={base:g})` records it); scidiff reads log1p (natural log) values: "
                         f"convert it (`adata.X = adata.X * np.log({base:g}); adata.uns['log1p']['base'] = None`) "
                         f"or pass its counts")


def log_normalize(counts, target_sum: float | None = 1e4):
    """``log1p(counts / total * target_sum)`` per cell (scanpy ``normalize_total`` + ``log1p``).

    ``target_sum=None`` uses the median total of cells with counts, as scanpy does. Returns the
    normalised matrix (sparse stays sparse) and the ``target_sum`` used.
    """
    totals = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()  # float16 counts' sums overflow past 65504
    if target_sum is None:
        target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    factor = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(counts):
        out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        out.data *= np.repeat(factor.astype(np.float32), np.diff(out.indptr))  # no float64 copy per value
        np.log1p(out.data, out=out.data)
        return out, float(target_sum)
    out = np.asarray(counts, dtype=np.float32) * factor[:, None].astype(np.float32)
    return np.log1p(out), float(target_sum)


def select_genes(log_matrix, var_names, genes=None, n_top_genes: int | None = 2000) -> list[str]:
    """A given gene list (checked), or exactly ``n_top_genes`` highly variable genes, or all genes.

    Highly variable: scanpy's ``highly_variable_genes(flavor='seurat')`` normalised dispersion on
    log-normalised values, ranked from the highest; ties keep the file's gene order and genes
    without a dispersion (constant ones) come last, so the count is exact (scanpy's own cut-off
    keeps every gene tied with the last one)."""
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
    if n_top_genes < 1:
        raise ValueError(f"the number of genes must be at least 1, got {n_top_genes}")
    order = np.argsort(-_normalized_dispersion(log_matrix, var_names), kind="stable")
    return [var_names[i] for i in np.sort(order[:n_top_genes])]


_EXPM1_SAFE, _EXPM1_CAP = 80.0, 300.0  # float32 expm1 overflows near 88.7; float64 squares near 354


def _normalized_dispersion(log_matrix, var_names) -> np.ndarray:
    """scanpy's seurat-flavour normalised dispersion per gene; ``-inf`` where it is undefined."""
    import scanpy as sc

    if float(_values(log_matrix).max(initial=0)) > _EXPM1_SAFE:
        # values insisted to be log1p (input_kind="log1p") beyond what float32 expm1 can hold: in
        # float64, capped where expm1 and its square stay finite (the dispersion only)
        log_matrix = log_matrix.astype(np.float64)
        vals = log_matrix.data if sp.issparse(log_matrix) else log_matrix
        np.minimum(vals, _EXPM1_CAP, out=vals)
    tmp = ad.AnnData(X=log_matrix)
    tmp.var_names = var_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # scanpy's default cut-offs (never its n_top_genes cut, which fails when no gene has a
        # dispersion); only dispersions_norm is used
        sc.pp.highly_variable_genes(tmp, flavor="seurat")
    disp = tmp.var["dispersions_norm"].to_numpy(dtype=np.float64)
    return np.where(np.isfinite(disp), disp, -np.inf)


def gene_columns(var_names, genes) -> np.ndarray:
    index = {str(g): i for i, g in enumerate(var_names)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise KeyError(f"{len(missing)} of the model's genes are not in the data: {missing[:20]}")
    return np.fromiter((index[g] for g in genes), dtype=np.int64, count=len(genes))


def dense(m) -> np.ndarray:
    return (m.toarray() if sp.issparse(m) else np.asarray(m)).astype(np.float32, copy=False)
