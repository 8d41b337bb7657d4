"""Checks of the matrices that enter scidiff, shared by the in-memory reader (``read_h5ad``,
``expression_matrix``) and the streaming reader (:mod:`scidiff.data.streaming`), so both refuse a
broken file with the same message. Every check is vectorised numpy, O(nnz), and runs before scipy
or the C++ densify touches an index. Errors are ``ValueError`` and name the file, the array and
the cell (or gene) at fault.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..checks import warn


@dataclass
class Site:
    """Where a matrix lives, for messages: ``source`` (``"'/path/f.h5ad'"`` or ``"the AnnData"``),
    ``key`` (``X``, ``layers/counts``, ``raw/X``), whether it is CSC (its major axis is genes), and
    ``names(i)``: the name of cell (CSR) or gene (CSC) ``i``, or ``None`` when unknown."""

    source: str
    key: str
    csc: bool = False
    names: Callable[[int], str | None] | None = None

    @property
    def prefix(self) -> str:
        return f"{self.source}: {self.key}"

    def major(self, i: int) -> str:
        """``cell 'AAAC-1' (row 17)`` (CSR) or ``gene 'CD3D' (column 17)`` (CSC)."""
        what, axis = ("gene", "column") if self.csc else ("cell", "row")
        try:
            name = self.names(int(i)) if self.names is not None else None
        except Exception:  # a name that cannot be read must not hide the real error
            name = None
        return f"{what} {name!r} ({axis} {int(i)})" if name is not None else f"{what} {int(i)} ({axis} {int(i)})"

    @property
    def minor(self) -> str:
        return "row" if self.csc else "column"


def index_names(index) -> Callable[[int], str]:
    """``names`` for a :class:`Site` from a pandas index (obs_names or var_names)."""
    return lambda i: str(index[i])


def check_indptr(indptr: np.ndarray, site: Site, *, n_major: int | None, n_data: int, n_indices: int,
                 rows: np.ndarray | None = None) -> None:
    """``indptr`` has ``n_major + 1`` integer entries, starts at 0, never decreases and ends within
    ``data`` and ``indices``. ``rows``: the file row of each entry's cell when ``indptr`` belongs to
    a block of a larger matrix (its first entry may then be above 0)."""
    ip = np.asarray(indptr)
    if ip.ndim != 1 or ip.dtype.kind not in "iu":
        raise ValueError(f"{site.prefix}/indptr must be a 1-D integer array, got {ip.dtype} of shape {ip.shape}")
    if n_major is not None and ip.shape[0] != n_major + 1:
        what = "gene" if site.csc else "cell"
        raise ValueError(f"{site.prefix}/indptr has {ip.shape[0]} entries but the shape attribute says {n_major} "
                         f"{what}s ({n_major + 1} expected): the file is corrupt")
    if ip.size == 0:
        raise ValueError(f"{site.prefix}/indptr is empty")
    if (rows is None and ip[0] != 0) or ip[0] < 0:
        raise ValueError(f"{site.prefix}/indptr must start at 0 (starts at {int(ip[0])})")
    steps = np.diff(ip.astype(np.int64, copy=False))
    if steps.size and steps.min() < 0:
        bad = int(np.flatnonzero(steps < 0)[0])
        at = bad if rows is None else int(rows[bad])
        raise ValueError(f"{site.prefix}/indptr is not monotone: {site.major(at)} ends at {int(ip[bad + 1])} "
                         f"before it starts at {int(ip[bad])}")
    end = int(ip[-1])
    for name, n in (("data", n_data), ("indices", n_indices)):
        if n < end:
            raise ValueError(f"{site.prefix}/{name} has {n} values but indptr ends at {end} "
                             "(truncated dataset or corrupt indptr)")


def check_indices(indptr: np.ndarray, indices: np.ndarray, n_minor: int, site: Site,
                  rows: np.ndarray | None = None) -> None:
    """Every stored index lies in ``[0, n_minor)`` (``indptr`` checked first). ``rows``: the file
    row of each cell of a block (for the message)."""
    if indices.dtype.kind not in "iu":
        raise ValueError(f"{site.prefix}/indices have dtype {indices.dtype}; expected integers")
    start, end = int(indptr[0]), int(indptr[-1])
    idx = indices[start:end]
    if idx.size == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo >= 0 and hi < n_minor:
        return
    k = int(np.flatnonzero((idx < 0) | (idx >= n_minor))[0])
    cell = int(np.searchsorted(indptr, start + k, side="right")) - 1
    at = cell if rows is None else int(rows[cell])
    raise ValueError(f"{site.prefix}/indices of {site.major(at)} holds {site.minor} {int(idx[k])}, "
                     f"outside [0, {n_minor})")


def check_sparse(matrix, source: str, key: str, obs_names=None, var_names=None) -> None:
    """A scipy CSR or CSC matrix (or array) of ``source`` at ``key`` whose arrays are consistent,
    checked before any scipy operation reads them; other formats and dense arrays pass. The
    names (pandas indexes) name the cell or gene at fault."""
    fmt = getattr(matrix, "format", None)
    if fmt not in ("csr", "csc"):
        return
    csc = fmt == "csc"
    names = var_names if csc else obs_names
    site = Site(source, key, csc, None if names is None else index_names(names))
    n_major, n_minor = matrix.shape[::-1] if csc else matrix.shape
    check_indptr(matrix.indptr, site, n_major=n_major, n_data=len(matrix.data), n_indices=len(matrix.indices))
    check_indices(matrix.indptr, matrix.indices, n_minor, site)


def check_unique_genes(var_names, where: str) -> None:
    """Gene names are unique (a duplicated name would mix two genes up in the model)."""
    names = np.asarray([str(g) for g in var_names], dtype=object)
    uniq, first, counts = np.unique(names, return_index=True, return_counts=True)
    if (counts == 1).all():
        return
    dup = uniq[counts > 1][np.argsort(first[counts > 1])]
    shown = ", ".join(f"{g!r} (columns {np.flatnonzero(names == g)[:4].tolist()})" for g in dup[:10])
    raise ValueError(f"{where} has {len(dup)} duplicated gene name(s): {shown}"
                     + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")
                     + "; make them unique first, e.g. `adata.var_names_make_unique()` before writing the file")


def _cell_name(names: Callable[[int], str | None], row: int) -> str:
    try:
        name = names(int(row))
    except Exception:  # a name that cannot be read must not hide the real error
        name = None
    return str(name) if name is not None else f"row {int(row)}"


def check_labelled(col, key: str, where: str, control: str | None = None,
                   names: Callable[[int], str | None] | None = None, known=None) -> None:
    """Every cell has a label in ``obs[key]``; otherwise the error names how many cells miss one,
    the first few, and the two ways out (cells without a label cannot be conditioned on): drop
    them, or label them ('unknown'; for a perturbation, ``control``, its control label, where a
    screen leaves the unperturbed cells unlabelled). ``names(row)``: the cells' names where
    ``col``'s index does not hold them (a streamed file's obs, read without its index).
    ``known``: a trained model's labels of ``key`` (cells given to a model): a label of their own
    is then no way out, one of these is. A perturbation's empty label (``''``) is missing too: it
    named no perturbation and was read as control."""
    missing = np.asarray(col.isna())
    blank = np.zeros_like(missing)
    if control is not None:
        blank = np.asarray(col.astype(object).map(lambda v: isinstance(v, str) and not v.strip()), dtype=bool)
        missing = missing | blank
    if not missing.any():
        return
    if names is None:
        cells = [str(c) for c in col.index[missing][:3]]
    else:
        cells = [_cell_name(names, i) for i in np.flatnonzero(missing)[:3]]
    more = f" and {int(missing.sum()) - 3} more" if missing.sum() > 3 else ""
    column = f"adata.obs[{key!r}]"
    kept = f"{column}.fillna('').astype(str).str.strip() != ''" if blank.any() else f"{column}.notna()"
    drop = f"drop those cells (`adata = adata[{kept}].copy()`)"
    if control is None and known is not None:
        known = [str(v) for v in known]
        fill = known[0] if known else "unknown"
        way = (f"give them one of the labels the model knows ({known[:10]}"
               + (f" and {len(known) - 10} more" if len(known) > 10 else "") + ")")
    elif control is None:
        fill, way = "unknown", "give them a label of their own"
    else:
        fill, way = control, "where a missing value means no perturbation (not an undetected guide), call them control"
    filled = (f".fillna('').replace(r'^\\s*$', {fill!r}, regex=True)" if blank.any() else f".fillna({fill!r})")
    what = f"missing values ({int(blank.sum())} of them empty labels)" if blank.any() else "missing values"
    raise ValueError(f"obs[{key!r}] of {where} has {int(missing.sum())} {what} (cells {cells}{more}): "
                     f"{drop} or {way} (`{column} = {column}.astype(object){filled}.astype('category')`)")


GENE_EXPRESSION = "Gene Expression"
FEATURE_TYPE_COLUMNS = ("feature_types", "feature_type")  # scanpy's read_10x_h5(gex_only=False); 10x, cellxgene


def feature_types(var) -> np.ndarray | None:
    """Each feature's type from ``var``'s ``feature_types`` (or ``feature_type``) column as text, or
    ``None`` where ``var`` has no such column."""
    column = next((c for c in FEATURE_TYPE_COLUMNS if c in getattr(var, "columns", ())), None)
    return None if column is None else np.asarray(var[column]).astype(str)


def rna_mask(types: np.ndarray) -> np.ndarray:
    """Which features of ``types`` (:func:`feature_types`) are RNA: ``Gene Expression``, or no type
    given (``""``, a missing value: genes only ``.raw`` holds, its types from ``var``)."""
    return np.isin(types, (GENE_EXPRESSION, "", "nan", "None"))


def rna_var(var):
    """``var`` on its RNA features (the rows :func:`rna_features` keeps, without its warning); as it
    is where every feature is RNA, none is Gene Expression, or no column gives the types."""
    types = feature_types(var)
    if types is None or not (types == GENE_EXPRESSION).any():
        return var
    rna = rna_mask(types)
    return var if rna.all() else var.iloc[np.flatnonzero(rna)]


def rna_features(var, where: str) -> np.ndarray | None:
    """The positions of the RNA (``Gene Expression``) features of ``var`` where its feature types
    name others too (CITE-seq's ``Antibody Capture``, ``CRISPR Guide Capture``, hashtags'
    ``Multiplexing Capture``, multiome's ``Peaks``), with one warning naming ``where``, those types
    and their counts; ``None`` where every feature is RNA or no column says. Only RNA is modelled
    (scanpy's ``gex_only``, Seurat's assays): other features are neither genes nor library size.
    A ``var`` without one Gene Expression feature is a ``ValueError`` naming ``where``."""
    types = feature_types(var)
    if types is None:
        return None
    rna = rna_mask(types)
    if rna.all():
        return None
    names, counts = np.unique(types[~rna], return_counts=True)
    found = ", ".join(f"{int(n)} {str(t)!r}" for t, n in zip(names, counts))
    if not (types == GENE_EXPRESSION).any():
        raise ValueError(f"{where} has no {GENE_EXPRESSION!r} feature (its feature types: {found}): scidiff models "
                         f"RNA expression; pass a file with its Gene Expression features")
    warn(f"{where}: left out {found} feature(s) of {len(types)}: only the {int(rna.sum())} "
         f"{GENE_EXPRESSION!r} features are modelled (genes chosen and cells normalised on them)")
    return np.flatnonzero(rna)
