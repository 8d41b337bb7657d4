"""What the verbs share about their input cells: the model's gene list, cells read into its space,
and each cell's own covariate codes."""
from __future__ import annotations

import anndata as ad
import pandas as pd
import torch

from ..checks import warn
from ..data import transform_like
from ..data.io import in_memory
from ..data.dataset import source_like
from ..data.gene_symbols import var_of


def read_cells(cells) -> ad.AnnData:
    """``cells`` as an AnnData in memory: itself, read from its ``.h5ad`` path, or a backed one's
    cells read from its file (:func:`scidiff.data.io.in_memory`)."""
    return in_memory(cells)


def model_spec(model):
    """The model's :class:`~scidiff.data.DataSpec`, or a clear error when it has none."""
    spec = getattr(model, "data_spec", None)
    if spec is None:
        raise ValueError("this model carries no gene list; train it through scidiff.setup_anndata")
    return spec


def model_cells(model, adata, *, layer: str | None = None, use_raw: bool | None = None):
    """``(spec, adata, cells)``: ``adata`` (an AnnData or an ``.h5ad`` path) read and its cells
    brought into ``model``'s genes and normalisation (:func:`scidiff.data.transform_like`)."""
    spec = model_spec(model)
    adata = read_cells(adata)
    return spec, adata, transform_like(spec, adata, layer=layer, use_raw=use_raw)


def own_codes(model, cells) -> dict[str, torch.Tensor]:
    """The cells' own covariate codes that the model reads; a perturbation column absent from
    ``obs`` means control."""
    spec, keys = model.data_spec, model.condition_encoder.keys
    codes = {k: v for k, v in cells.covariates.items() if k in keys}
    for key in spec.perturbation_keys:
        codes.setdefault(key, torch.zeros(len(cells), len(spec.categorical[key]) + 1))
    return codes


def keep_var_columns(result: ad.AnnData, adata: ad.AnnData, spec, *, layer: str | None = None,
                     use_raw: bool | None = None) -> None:
    """Give ``result`` (cells over the model's genes) each column of the input's ``var`` that it
    lacks (Ensembl IDs, feature types, highly-variable flags), gene for gene: the model's gene
    matched in the ``var`` its cells were read from (``.raw``'s where they were) by ID or symbol
    (:meth:`~scidiff.data.DataSpec.names_in`)."""
    var = var_of(adata, source_like(spec, adata, layer, use_raw)[1])
    rows = var.reindex(pd.Index(spec.names_in([str(g) for g in var.index], var)))
    for column in var.columns:
        if column not in result.var.columns:
            result.var[column] = rows[column].to_numpy()


SOURCE_COLUMN = "scidiff_source_cell"


def source_named(obs: pd.DataFrame, where: str) -> pd.DataFrame:
    """The ``obs`` of predicted cells (one per input cell, in their order, named as they are) with
    each cell's input name in ``obs['scidiff_source_cell']`` (its link to its source, kept however
    the rows are renamed: ``<cell>-<i>`` for target ``i`` of a screen) and a unique index: names the
    input cells share (``where``: those cells, for the warning) made unique as
    ``adata.obs_names_make_unique()`` makes them (``c0``, ``c0-1``), as anndata and scanpy's
    concatenation need them."""
    names = pd.Index([str(n) for n in obs.index])
    obs = obs.copy()
    obs[SOURCE_COLUMN] = pd.Categorical(list(names))
    if not names.is_unique:
        shared = names[names.duplicated()].unique()
        warn(f"{len(shared)} obs_names of {where} are shared by several cells (e.g. {str(shared[0])!r}): the "
             "predicted cells' names are made unique as `adata.obs_names_make_unique()` makes them; "
             f"obs[{SOURCE_COLUMN!r}] keeps each one's input name")
        obs.index = ad.utils.make_index_unique(names)
    return obs


def h5_keys(obj):
    """``obj`` for ``.uns``: a mapping whose keys hold ``/`` (labels such as ``CD8+/CD45RA+``,
    which HDF5 would read as a path) becomes ``{"names": [...], "values": [...]}``, the values
    ``{"0": ..., "1": ...}`` where some are mappings or lists (no array HDF5 stores)."""
    if not isinstance(obj, dict):
        return obj
    if any("/" in k for k in obj):
        values = [h5_keys(v) for v in obj.values()]
        if any(isinstance(v, (dict, list, tuple)) for v in values):
            values = {str(i): v for i, v in enumerate(values)}
        return {"names": list(obj), "values": values}
    return {k: h5_keys(v) for k, v in obj.items()}


def h5_mapping(obj) -> dict:
    """A mapping of ``.uns`` as a dict, read back from :func:`h5_keys`'s ``names``/``values``."""
    obj = dict(obj or {})
    if set(obj) == {"names", "values"}:
        values = obj["values"]
        values = [values[str(i)] for i in range(len(values))] if isinstance(values, dict) else values
        return dict(zip(map(str, obj["names"]), values))
    return obj
