"""Set a model's data space up from an ``.h5ad`` that is streamed, never loading ``X``.

:func:`setup_streaming` is :func:`~scidiff.data.setup_anndata` for files larger than memory:
the input kind and the highly variable genes come from a random subsample of whole blocks of
cells (or a given gene list), and the per-gene offset and scale, plus the mean and covariance the
latent needs (:meth:`ScIDiffModel.fit_latent_from_moments`), come from one streamed pass over all
cells. :func:`stream_like` brings another file into an existing model's space.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from ..checks import yes_no
from .block_order import BlockOrder, as_runs, runs_to_ids
from .dataset import _encode_obs, check_controls, log_total, setup_arguments, training_scale
from .gene_symbols import with_var_columns
from .h5ad_layout import naming_file, obs_name_reader
from .moments import GeneMoments
from .preprocess import AllZeroError, detect_input, gene_columns, log_normalize, select_genes, warn_empty_cells
from .spec import DataSpec, _build_spec, covariate_keys, label_type, record_symbols
from .streaming import CodedCovariate, MatrixReader, StreamingLoader, Transform
from .validate import check_labelled, rna_var


@dataclass
class StreamedCells:
    """Cells of a file on disk in a model's space (the streaming twin of :class:`CellData`).

    ``runs``: the cells (``[k, 2]`` ranges of row numbers); ``covariates``: codes over all rows
    of the file; ``moments``: mean ``[G]``, population covariance ``[G, G]`` and cell count, in
    model space, of the cells :func:`setup_streaming` saw (``None`` for :func:`stream_like`).
    """

    reader: MatrixReader
    spec: DataSpec
    covariates: dict[str, np.ndarray]
    runs: np.ndarray
    moments: dict | None = None
    loader_options: dict = field(default_factory=dict)
    file_var: pd.DataFrame | None = None  # the file's var where its genes are named unlike the model's
    rescale: float | None = None  # values brought to the model's scale (:func:`stream_like`)

    def __len__(self) -> int:
        return int((self.runs[:, 1] - self.runs[:, 0]).sum())

    @property
    def transform(self) -> Transform:
        return Transform.from_spec(self.spec, self.reader.var_names, self.file_var, rescale=self.rescale)

    def cell_ids(self) -> np.ndarray:
        return runs_to_ids(self.runs)

    def loader(self, batch_size: int = 256, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
               **options) -> StreamingLoader:
        """A :class:`StreamingLoader` over these cells (``options``: block_size, fetch_batches,
        prefetch, rank, world_size, ... on top of those given at setup)."""
        return StreamingLoader(self.reader, self.transform, self.covariates, self.runs, batch_size=batch_size,
                               shuffle=shuffle, seed=seed, drop_last=drop_last,
                               **{**self.loader_options, **options})

    def sample_x(self, n_cells: int, seed: int = 0):
        """About ``n_cells`` of these cells (random whole blocks, all of them when there are fewer)
        in model space, ``[n, G]`` float32 tensor: what a subsample-fitted part of the model reads."""
        block = self.loader_options.get("block_size") or self.reader.default_block_size()
        ids = self.cell_ids()
        if n_cells < len(ids):
            ids = ids[runs_to_ids(_sample_runs(len(ids), n_cells, block, seed))]
        return self.read_x(ids)

    def read_x(self, rows, batch_size: int = 4096):
        """The cells of file rows ``rows`` (any order, repeats allowed) in model space, ``[len(rows),
        G]`` float32 tensor, in that order."""
        import torch

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        distinct, back = np.unique(rows, return_inverse=True)
        out = torch.zeros(len(distinct), self.spec.n_genes)
        if len(distinct):
            loader = StreamingLoader(self.reader, self.transform, None, as_runs(distinct), batch_size=batch_size,
                                     shuffle=False, fetch_batches=1, prefetch=1, return_index=True, pin_memory=False)
            for batch in loader:
                out[torch.as_tensor(np.searchsorted(distinct, batch["cell_index"].numpy()))] = batch["x"]
        return out[torch.as_tensor(back.reshape(-1))]

    def subset(self, cells) -> "StreamedCells":
        """These cells restricted to ``cells`` (sorted row numbers or runs)."""
        return StreamedCells(self.reader, self.spec, self.covariates, as_runs(cells), self.moments,
                             dict(self.loader_options), self.file_var, self.rescale)

    def split(self, val_fraction: float = 0.1, seed: int = 0):
        """Random train/validation split by whole blocks of cells (they stay contiguous on disk)."""
        block = self.loader_options.get("block_size") or self.reader.default_block_size()
        train, val = BlockOrder(self.runs, batch_size=1, block_size=block).split(val_fraction, seed)
        return self.subset(train), self.subset(val)


def read_var(path: str, use_raw: bool = False) -> pd.DataFrame:
    """The file's ``var`` (``raw/var`` with ``use_raw``, with ``var``'s text columns it lacks:
    :func:`~scidiff.data.gene_symbols.with_var_columns`): gene IDs and their columns, its Gene
    Expression features alone where it has others (the genes :class:`MatrixReader` reads)."""
    read_elem = getattr(getattr(ad, "io", None), "read_elem", None) or ad.experimental.read_elem
    group = "raw/var" if use_raw else "var"
    with naming_file(path), h5py.File(path, "r") as f:
        if group not in f:
            raise KeyError(f"{path!r} has no {group!r} (gene names)")
        var = read_elem(f[group])
        main = read_elem(f["var"]) if use_raw and "var" in f else None
    var.index = var.index.astype(str)
    return rna_var(with_var_columns(var, main))  # the reader's genes: RNA alone where ADTs, guides are beside them


def _read_obs(path: str, keys) -> pd.DataFrame:
    """Only the ``obs`` columns named in ``keys`` (an error lists the available ones); all of
    them with ``keys=None``."""
    read_elem = getattr(getattr(ad, "io", None), "read_elem", None) or ad.experimental.read_elem
    with naming_file(path), h5py.File(path, "r") as f:
        obs = f["obs"]
        if isinstance(obs, h5py.Dataset):  # legacy compound-dtype obs
            frame = read_elem(obs)
            return frame if keys is None else frame[[k for k in keys if k in frame.columns]]
        columns = [str(c) for c in obs.attrs.get("column-order", [])]
        if keys is None:
            keys = columns
        missing = [k for k in keys if k not in columns]
        if missing:
            raise KeyError(f"obs key(s) {missing} not in {path!r}; available obs keys: {columns}")
        return pd.DataFrame({k: read_elem(obs[k]) for k in keys})


def _holder(obs: pd.DataFrame, path: str) -> ad.AnnData:
    holder = ad.AnnData(obs=obs.set_axis([str(i) for i in range(len(obs))]))
    holder.uns["scidiff_source"] = path
    return holder


def _encode_covariates(reader, keys, continuous, vocab=None, perturbation_keys=(), control_labels=("control", "ctrl"),
                       separator="+"):
    """Codes over all cells, as :func:`setup_anndata` makes them. Perturbation covariates are
    encoded once per distinct label and looked up per cell (:class:`CodedCovariate`)."""
    keys, continuous = list(keys), list(continuous)
    if not keys and not continuous:
        return {}, {}
    obs = _read_obs(reader.path, keys + continuous)
    if len(obs) != reader.n_cells:
        raise ValueError(f"{reader.path!r}: obs has {len(obs)} rows but {reader.layout.key} has {reader.n_cells} cells")
    pert = [k for k in perturbation_keys if k in keys]
    for key in keys:  # before the codes: name the unlabelled cells as obs names, not as positions
        check_labelled(obs[key], key, repr(reader.path), (list(control_labels) or [None])[0] if key in pert else None,
                       names=obs_name_reader(reader.path), known=vocab.get(key) if vocab is not None else None)
    codes, vocabs = _encode_obs(_holder(obs, reader.path), [k for k in keys if k not in pert], continuous, vocab=vocab)
    codes = {k: v.numpy() for k, v in codes.items()}
    for key in pert:
        col = obs[key]
        labels, inverse = np.unique(col.astype(str).to_numpy(), return_inverse=True)
        if vocab is None:  # training: the control cells must be there
            check_controls(key, labels, np.bincount(inverse, minlength=len(labels)), control_labels, separator,
                           repr(reader.path))
        table, vocab_k = _encode_obs(_holder(pd.DataFrame({key: labels}), reader.path), [key], [], vocab=vocab,
                                     perturbation_keys=[key], control_labels=control_labels, separator=separator,
                                     check_control=False)
        codes[key], vocabs[key] = CodedCovariate(table[key].numpy(), inverse.astype(np.int64)), vocab_k[key]
    return codes, vocabs


def _sample_runs(n_cells: int, n_sample: int, block: int, seed: int) -> np.ndarray:
    """Random whole blocks holding about ``n_sample`` cells (all cells when that is more)."""
    if n_sample >= n_cells:
        return np.array([[0, n_cells]], np.int64)
    n_blocks = -(-n_cells // block)
    pick = np.sort(np.random.default_rng(seed).choice(n_blocks, max(1, -(-n_sample // block)), replace=False))
    starts = pick * block
    return as_runs(np.stack([starts, np.minimum(starts + block, n_cells)], 1))


def _sample_kind(reader: MatrixReader, sample, input_kind: str, option: str) -> str:
    """:func:`detect_input` on a sample of the file's cells. A sample that is all zeros refuses the
    file when every cell is zero (one streamed pass decides), else asks for a larger sample."""
    try:
        return detect_input(sample, reader.layout.where, input_kind)
    except AllZeroError:
        if sample.shape[0] >= reader.n_cells or not library_sizes(reader, [[0, reader.n_cells]]).any():
            raise
        raise ValueError(f"{reader.layout.where}: the {sample.shape[0]} cells sampled to read the input kind all "
                         f"have zero counts, though other cells do not; sample more cells ({option}=...)") from None


def library_sizes(reader: MatrixReader, runs, cells_per_read: int = 65536) -> np.ndarray:
    """Total counts of each cell of ``runs`` (over all genes), streamed."""
    out = []
    order = BlockOrder(runs, batch_size=cells_per_read, block_size=cells_per_read, fetch_batches=1, shuffle=False)
    for group in order.groups():
        block = reader.read(group.runs)
        if block.x is not None:
            out.append(block.x.sum(1, dtype=np.float64))
        else:
            cs = np.r_[0.0, np.cumsum(block.data, dtype=np.float64)]
            out.append(cs[block.indptr[1:]] - cs[block.indptr[:-1]])
    return np.concatenate(out) if out else np.zeros(0)


def stream_moments(reader: MatrixReader, transform: Transform, runs, *, covariance: bool = True,
                   cells_per_read: int = 4096, progress: bool = False) -> GeneMoments:
    """One pass over the cells of ``runs`` in ``transform``'s space: mean, variance, covariance."""
    from tqdm.auto import tqdm

    moments = GeneMoments(transform.n_genes, covariance)
    loader = StreamingLoader(reader, transform, None, runs, batch_size=cells_per_read, shuffle=False,
                             fetch_batches=1, prefetch=2, pin_memory=False)
    for batch in tqdm(loader, desc="gene moments", unit="batch", disable=not progress):
        moments.update(batch["x"].numpy())
    return moments


def stream_group_moments(cells: StreamedCells, groups: dict, *, transform: Transform | None = None,
                         cells_per_read: int = 4096, progress: bool = False) -> dict:
    """One streamed pass over ``cells`` in model space (or ``transform``'s): for each grouping of
    ``groups`` (``name -> (group number of every row of the file, -1 for none; number of
    groups)``), every group's cell count, sum and sum of squares, float64 ``([M], [M, G], [M, G])``."""
    from scipy import sparse
    from tqdm.auto import tqdm

    n_genes = cells.spec.n_genes
    out = {k: (np.zeros(m), np.zeros((m, n_genes)), np.zeros((m, n_genes))) for k, (_, m) in groups.items()}
    loader = StreamingLoader(cells.reader, transform or cells.transform, {k: g for k, (g, _) in groups.items()},
                             cells.runs, batch_size=cells_per_read, shuffle=False, fetch_batches=1, prefetch=2,
                             pin_memory=False)
    for batch in tqdm(loader, desc="perturbation groups", unit="batch", disable=not progress):
        x = batch["x"].numpy().astype(np.float64)
        squares = x * x
        for k, (counts, sums, sq) in out.items():
            g = batch[k].numpy()
            rows = np.flatnonzero(g >= 0)
            member = sparse.csr_matrix((np.ones(len(rows)), (g[rows], rows)), shape=(len(counts), len(x)))
            counts += np.bincount(g[rows], minlength=len(counts))
            sums += member @ x
            sq += member @ squares
    return out


def _scaling(moments: GeneMoments, scaling: str):
    mean, var = moments.mean, moments.var
    if scaling == "none":
        return np.zeros_like(mean), np.ones_like(mean)
    if scaling == "global":
        return mean, np.full_like(mean, max(float(np.sqrt(var.mean())), 1e-6))
    if scaling == "gene":
        return mean, np.maximum(np.sqrt(var), 1e-3)
    raise ValueError(f"scaling must be 'global', 'gene' or 'none', got {scaling!r}")


def setup_streaming(path, *, layer: str | None = None, use_raw: bool = False, genes=None,
                    n_top_genes: int | None = 2000, condition_keys=(), continuous_keys=(), input_kind: str = "auto",
                    target_sum: float | None = 1e4, scaling: str = "global", hvg_cells: int = 20000,
                    covariance: bool = True, seed: int = 0, backend: str = "auto", n_threads: int | None = None,
                    progress: bool = False, perturbation_keys=(), control_labels=("control", "ctrl"),
                    dose_key: str | None = None, separator: str = "+", gene_symbols: str | None = "auto",
                    **loader_options) -> StreamedCells:
    """:func:`~scidiff.data.setup_anndata` for a file that is streamed (arguments alike, and the
    same vocabularies, genes and scaling up to float rounding).

    ``hvg_cells``: cells (random whole blocks) used to detect the input kind and choose the
    ``n_top_genes`` highly variable genes; with ``hvg_cells >= n_cells`` the choice equals
    ``setup_anndata``'s. ``covariance``: also accumulate the gene x gene covariance a latent
    model needs. ``loader_options`` go to every :class:`StreamingLoader` made from the result.
    """
    use_raw, covariance, progress = (yes_no(name, value) for name, value in (  # 'no' read as true
        ("use_raw", use_raw), ("covariance", covariance), ("progress", progress)))
    genes, n_top_genes, condition_keys, continuous_keys, perturbation_keys, control_labels, separator = \
        setup_arguments(genes, n_top_genes, condition_keys, continuous_keys, perturbation_keys, control_labels,
                        separator)
    reader = MatrixReader(path, layer=layer, use_raw=use_raw, backend=backend, n_threads=n_threads)
    if reader.n_cells == 0 or reader.layout.n_genes == 0:
        raise ValueError(f"{reader.layout.where} is empty ({reader.n_cells} cells x {reader.layout.n_genes} genes)")
    condition_keys, continuous_keys = covariate_keys(condition_keys, continuous_keys, perturbation_keys, dose_key)
    codes, vocabs = _encode_covariates(reader, condition_keys, continuous_keys, None, perturbation_keys,
                                       control_labels, separator)
    block = loader_options.get("block_size") or reader.default_block_size()
    sampled = _sample_runs(reader.n_cells, hvg_cells, block, seed)
    sample = reader.read_matrix(sampled)
    all_cells = np.array([[0, reader.n_cells]], np.int64)
    kind = _sample_kind(reader, sample, input_kind, "hvg_cells")
    warn_empty_cells(sample, reader.layout.where, [f"row {i}" for i in runs_to_ids(sampled)],
                     sampled_from=reader.n_cells if sample.shape[0] < reader.n_cells else None)
    if kind == "counts":
        if target_sum is None:
            totals = library_sizes(reader, all_cells)
            target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
        sample, _ = log_normalize(sample, target_sum)
    else:
        target_sum = None
    chosen = select_genes(sample, reader.var_names, genes, n_top_genes)
    total = log_total(sample[:, gene_columns(reader.var_names, chosen)])  # on the sampled cells
    del sample
    plain = Transform.build(reader.var_names, chosen, counts=kind == "counts", target_sum=target_sum)
    moments = stream_moments(reader, plain, all_cells, covariance=covariance, progress=progress)
    offset, scale = _scaling(moments, scaling)
    spec = _build_spec(chosen, kind, target_sum, offset, scale, vocabs, codes, continuous_keys=continuous_keys,
                       layer=layer, use_raw=use_raw, perturbation_keys=perturbation_keys,
                       control_labels=control_labels, separator=separator, dose_key=dose_key,
                       obs=_read_obs(reader.path, None) if perturbation_keys else None)
    if not perturbation_keys and vocabs:  # the labels' types (booleans, integers), from their columns alone
        spec.label_types = {k: t for k, col in _read_obs(reader.path, list(vocabs)).items()
                            if (t := label_type(col)) is not None}
    spec.log_total = total
    record_symbols(spec, read_var(reader.path, use_raw), gene_symbols,
                   f"{'raw/var' if use_raw else 'var'} of {reader.path!r}")
    off32 = np.asarray(spec.gene_offset, np.float32).astype(np.float64)
    sc32 = np.asarray(spec.gene_scale, np.float32).astype(np.float64)
    model_moments = {"mean": (moments.mean - off32) / sc32, "n": moments.n,
                     "cov": moments.cov / np.outer(sc32, sc32) if covariance else None}
    return StreamedCells(reader, spec, codes, all_cells, model_moments, dict(loader_options))


def stream_like(spec: DataSpec, path, *, layer: str | None = None, use_raw: bool | None = None,
                condition_keys=None, input_kind: str = "auto", check_cells: int = 2000, backend: str = "auto",
                n_threads: int | None = None, **loader_options) -> StreamedCells:
    """Stream another file in an existing model's space (:func:`~scidiff.data.transform_like`
    for files on disk): same genes, normalisation, scaling and vocabularies; missing genes and
    unknown labels are errors that name them. The input kind is checked on ``check_cells`` cells,
    and, where it is not the model's, the scale too: counts for a log1p model, or log1p values
    normalised to another total for a counts model, are brought to the training cells' scale with
    a warning, as ``transform_like`` does (the factor from those cells' mean log total)."""
    if layer is None and use_raw is None:
        layer, use_raw = spec.source.get("layer"), spec.source.get("use_raw", False)
        with naming_file(os.fspath(path)), h5py.File(path, "r") as f:
            if layer and f"layers/{layer}" not in f:
                layer = None
            if use_raw and "raw/X" not in f:
                use_raw = False
    reader = MatrixReader(path, layer=layer, use_raw=bool(use_raw), backend=backend, n_threads=n_threads)
    sample = reader.read_matrix(_sample_runs(reader.n_cells, check_cells, reader.default_block_size(), 0))
    kind = _sample_kind(reader, sample, input_kind, "check_cells")
    transform_spec = DataSpec(**{**spec.to_dict(), "input_kind": kind,
                                 "target_sum": (spec.target_sum or 1e4) if kind == "counts" else None})
    file_var = None if set(spec.gene_names) <= set(reader.var_names) else read_var(reader.path, bool(use_raw))
    columns = Transform.from_spec(transform_spec, reader.var_names, file_var).gene_cols  # names missing genes now
    rescale = _rescale_like(spec, reader, sample, kind, columns)
    keys = [k for k in (spec.categorical if condition_keys is None else condition_keys)]
    with naming_file(reader.path), h5py.File(reader.path, "r") as f:
        present = set(f["obs"].attrs.get("column-order", [])) if isinstance(f["obs"], h5py.Group) else set()
    keys = [k for k in keys if k in present]
    cont = [k for k in spec.continuous if k in present]
    codes, _ = _encode_covariates(reader, keys, cont, spec.categorical, spec.perturbation_keys, spec.control_labels,
                                  spec.separator)
    return StreamedCells(reader, transform_spec, codes, np.array([[0, reader.n_cells]], np.int64), None,
                         dict(loader_options), file_var, rescale)


def _rescale_like(spec: DataSpec, reader: MatrixReader, sample, kind: str, columns) -> float | None:
    """:func:`~scidiff.data.dataset.training_scale` of the sampled cells (on the model's genes)."""
    if kind == spec.input_kind or spec.log_total is None:
        return None
    sample = sample.astype(np.float32)  # scipy indexes no float16 columns
    if kind == "counts":
        sample, _ = log_normalize(sample, spec.target_sum or 1e4)
    return training_scale(spec, sample[:, columns], kind, reader.layout.where, "layer=..., or use_raw=True")
