"""Users' own .h5ad files as they come: counts in a layer or .raw beside log1p in X, log1p values
normalised to another total, var columns and embeddings to keep, missing labels, compressed files."""
import gzip
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scidiff
from scidiff.data import read_h5ad, setup_anndata, transform_like
from scidiff.tasks.denoise import denoise


def _cells(n=120, genes=30, seed=0):
    """Counts in ``layers['counts']``, scanpy's default log1p (normalised to the median total) in
    ``X``, symbols and a number per gene in ``var``, an embedding in ``obsm``."""
    rng = np.random.default_rng(seed)
    profiles = rng.dirichlet(np.ones(genes) * 0.5, size=2)
    labels = np.repeat([0, 1], n // 2)
    counts = rng.poisson(profiles[labels] * rng.integers(300, 900, n)[:, None]).astype(np.float32)
    totals = counts.sum(1, keepdims=True)
    adata = ad.AnnData(X=sp.csr_matrix(np.log1p(counts / totals * np.median(totals))),
                       obs=pd.DataFrame({"cell_type": pd.Categorical([f"t{i}" for i in labels])},
                                        index=[f"c{i}" for i in range(n)]))
    adata.var_names = [f"G{i}" for i in range(genes)]
    adata.var["n_cells"] = (counts > 0).sum(0)
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.obsm["X_umap"] = rng.normal(size=(n, 2)).astype(np.float32)
    adata.uns["cell_type_colors"] = ["#ff0000", "#0000ff"]
    return adata


def _model(adata, **kwargs):
    torch.manual_seed(0)
    data = setup_anndata(adata, n_top_genes=None, condition_keys=["cell_type"], **kwargs)
    return scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=8)


def test_posterior_reads_the_counts_the_model_was_trained_on():
    """A model trained on layers['counts'] reads that layer by default (sdedit did, posterior read X
    and refused its log1p values); the refusal names the file's layers and the command's flags."""
    adata = _cells()
    model = _model(adata, layer="counts")
    default = denoise(model, adata, method="posterior", steps=5, progress=False)
    given = denoise(model, adata, method="posterior", layer="counts", steps=5, progress=False)
    np.testing.assert_allclose(default.layers["scidiff_denoised"], given.layers["scidiff_denoised"], atol=1e-6)
    log_model = _model(adata)
    with pytest.raises(ValueError, match=r"X of the AnnData holds log-normalised values.*--layer NAME.*\['counts'\]"):
        denoise(log_model, adata, method="posterior", steps=5, progress=False)


def test_denoise_keeps_the_inputs_var_columns_obsm_and_uns_gene_for_gene():
    """The output carries the input's var columns (of the same gene, whatever the input's gene
    order), its embeddings and uns, as a copy of the input restricted to the model's genes."""
    adata = _cells()
    model = _model(adata, layer="counts")
    shuffled = adata[:, np.random.default_rng(1).permutation(adata.n_vars)].copy()
    out = denoise(model, shuffled, layer="counts", steps=5, progress=False)
    assert list(out.var_names) == model.data_spec.gene_names
    np.testing.assert_array_equal(out.var["n_cells"].to_numpy(), adata.var.loc[out.var_names, "n_cells"].to_numpy())
    np.testing.assert_array_equal(out.obsm["X_umap"], adata.obsm["X_umap"])
    assert list(out.uns["cell_type_colors"]) == ["#ff0000", "#0000ff"] and "scidiff_denoise" in out.uns


def test_log1p_values_for_a_counts_model_are_brought_to_its_scale_with_a_warning():
    """scanpy's normalize_total normalises to the median total, not 10,000: such log1p values
    given to a model trained on counts are rescaled to the counts' scale, with a warning, not
    read as 10,000-normalised without a word."""
    adata = _cells()
    spec = _model(adata, layer="counts").data_spec
    exact = transform_like(spec, adata, layer="counts").log_expression()
    with pytest.warns(UserWarning, match=r"log1p values of the AnnData look normalised to about .* not the 10,000"):
        from_log = transform_like(spec, adata, use_raw=False).log_expression()
    assert np.abs(np.asarray(from_log) - np.asarray(exact)).mean() < 0.05 * np.asarray(exact).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counts for a counts model: as they were
        transform_like(spec, adata, layer="counts")


def test_missing_labels_of_cells_for_a_model_are_told_the_models_labels():
    """A cell without a label given to a trained model: the advice is one of the model's labels
    (a label of its own, 'unknown', is refused next as a value the model does not know)."""
    adata = _cells()
    model = _model(adata, layer="counts")
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[3] = np.nan
    adata.obs["cell_type"] = pd.Categorical(labels)
    with pytest.raises(ValueError, match=r"1 missing values .* one of the labels the model knows \(\['t0', 't1'\]\)"
                                         r".*fillna\('t0'\)"):
        denoise(model, adata, steps=5, progress=False)


def test_compressed_h5ad_is_refused_with_how_to_decompress(tmp_path):
    adata = _cells()
    plain = tmp_path / "cells.h5ad"
    adata.write_h5ad(plain)
    packed = tmp_path / "cells.h5ad.gz"
    with open(plain, "rb") as f, gzip.open(packed, "wb") as g:
        shutil.copyfileobj(f, g)
    with pytest.raises(ValueError, match=r"cells\.h5ad\.gz' is gzip-compressed.*gunzip -k"):
        read_h5ad(packed)


def test_genes_missing_from_x_but_in_raw_say_use_raw():
    """scanpy's layout: X on a subset of genes, .raw on all; the model's genes missing from X are
    named with where they were read and that .raw holds them."""
    adata = _cells()
    model = _model(adata, layer="counts")
    small = adata[:, :20].copy()
    small.raw = ad.AnnData(X=adata.layers["counts"], var=adata.var)
    del small.layers["counts"]
    with pytest.raises(KeyError, match=r"10 of the model's genes are not in the data.*read from X of the AnnData"
                                       r".*\.raw holds them all: pass --use-raw"):
        denoise(model, small, steps=5, progress=False)
    out = denoise(model, small, use_raw=True, method="posterior", steps=5, progress=False)
    assert out.n_vars == 30


def test_cells_without_a_covariate_column_are_denoised_under_the_null_condition_with_a_warning():
    adata = _cells()
    model = _model(adata, layer="counts")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the column there: no word
        denoise(model, adata, steps=5, progress=False)
    bare = adata.copy()
    del bare.obs["cell_type"]
    said = r"has no column \['cell_type'\] of the model's covariates.*null condition"
    with pytest.warns(UserWarning, match=said) as seen:
        denoise(model, bare, steps=5, progress=False)
    assert seen[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper (the CLI's format needs it)
