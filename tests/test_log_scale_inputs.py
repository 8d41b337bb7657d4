"""log2(x + 1) expression (limma or Seurat habits: ``np.log2(normalised + 1)``) brought to a set-up
or to new cells for a trained model was read as log1p (natural log): every value 1.44 times too
large. Refused where every cell's ``2**x - 1`` sums to one total and its ``expm1`` does not; log1p
files (all genes or some) and counts are read as before. Tiny synthetic data."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scidiff.data import setup_anndata, setup_streaming, transform_like
from scidiff.data.preprocess import common_total

N_CELLS, N_GENES = 100, 30
COUNTS = np.random.default_rng(0).poisson(np.linspace(0.5, 8, N_GENES), size=(N_CELLS, N_GENES)).astype(np.float32)
NORM = COUNTS / COUNTS.sum(1, keepdims=True) * 1e4
LOG2 = r"X of 'cells\.h5ad' looks log2-transformed: every cell's 2\*\*x - 1 sums to 10,000.*adata\.X \* np\.log\(2\)"


def _adata(x, source="cells.h5ad"):
    a = ad.AnnData(X=np.asarray(x, np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(len(x))]))
    a.var_names = [f"G{i}" for i in range(x.shape[1])]
    a.uns["scidiff_source"] = source
    return a


def _setup(x):
    return setup_anndata(_adata(x), n_top_genes=None)


def test_setup_refuses_log2_naming_the_file():
    with pytest.raises(ValueError, match=LOG2):
        _setup(np.log2(NORM + 1))
    with pytest.raises(ValueError, match=LOG2):  # sparse alike
        setup_anndata(_sparse(np.log2(NORM + 1)), n_top_genes=None)
    assert _setup(np.log2(NORM + 1) * np.log(2)).spec.input_kind == "log1p"  # converted as the error says
    insisted = setup_anndata(_adata(np.log2(NORM + 1)), n_top_genes=None, input_kind="log1p")  # the user's call
    assert insisted.spec.input_kind == "log1p"


def _sparse(x):
    a = _adata(x)
    a.X = sp.csr_matrix(a.X)
    return a


def test_new_cells_for_a_trained_model_refuse_log2():
    spec = _setup(COUNTS).spec
    with pytest.raises(ValueError, match=LOG2):
        transform_like(spec, _adata(np.log2(NORM + 1)))


def test_log1p_counts_and_gene_subsets_are_still_read():
    assert _setup(COUNTS).spec.input_kind == "counts"
    assert _setup(np.log1p(NORM)).spec.input_kind == "log1p"
    assert _setup(np.log1p(NORM / 10)).spec.input_kind == "log1p"  # scanpy's median-like total, not 10,000
    # log1p of a file normalised over all genes, then cut to some: the totals vary in either base
    assert _setup(np.log1p(NORM)[:, :12]).spec.input_kind == "log1p"
    assert _setup(np.log2(NORM + 1)[:, :12]).spec.input_kind == "log1p"  # no evidence there: not refused
    spec = _setup(COUNTS).spec
    assert transform_like(spec, _adata(np.log1p(NORM))).x.shape == (N_CELLS, N_GENES)


def test_common_total_dense_and_sparse():
    for x in (np.log1p(NORM), sp.csr_matrix(np.log1p(NORM))):
        assert common_total(x, "X") == pytest.approx(1e4, rel=1e-3)
    assert common_total(np.log1p(NORM[:, :12]), "X") is None
    assert common_total(COUNTS, "X") is None
    with pytest.raises(ValueError, match=r"layers/log2 of 'a\.h5ad' looks log2-transformed"):
        common_total(sp.csr_matrix(np.log2(NORM + 1)), "layers/log2 of 'a.h5ad'")


def test_streamed_setup_refuses_log2(tmp_path):
    path = tmp_path / "cells.h5ad"
    a = _adata(np.log2(NORM + 1))
    a.X = sp.csr_matrix(a.X)
    del a.uns["scidiff_source"]
    a.write_h5ad(path)
    with pytest.raises(ValueError, match="looks log2-transformed.*np\\.log\\(2\\)") as err:
        setup_streaming(path, n_top_genes=None, covariance=False)
    assert "cells.h5ad" in str(err.value)
    a.X = sp.csr_matrix(np.log1p(NORM).astype(np.float32))
    a.write_h5ad(path)
    assert setup_streaming(path, n_top_genes=None, covariance=False).spec.input_kind == "log1p"
