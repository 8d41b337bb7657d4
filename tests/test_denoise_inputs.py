"""Bugs a first-time user met denoising their own AnnData (scidiff.denoise, scidiff denoise, the
molecular cross-validation scores), each reproduced first: a test here failed before its fix."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scidiff
from scidiff.cli import main
from scidiff.evaluation.denoising import best_pca_denoiser, counts_from_log, mcv_scores, mse, poisson_loss
from scidiff.tasks.denoise import binomial_split, denoise
from scidiff.training import save_model
from shared_data import shared_file

GENES = 30


def counts_cells(n: int = 300, seed: int = 1) -> ad.AnnData:
    """Poisson counts of three cell types (known profiles) in X, dense float32."""
    rng = np.random.default_rng(seed)
    profiles = rng.dirichlet(np.ones(GENES) * 0.5, size=3)
    labels = np.repeat(np.arange(3), n // 3)
    counts = rng.poisson(profiles[labels] * rng.integers(800, 1600, len(labels))[:, None]).astype(np.float32)
    obs = pd.DataFrame({"cell_type": [f"type{i}" for i in labels]}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(GENES)]))


def with_other_genes(cells: ad.AnnData) -> ad.AnnData:
    """``cells`` with two genes the model does not know (no counts: the libraries stay) before its own."""
    x = np.hstack([np.zeros((cells.n_obs, 2), np.float32), cells.X])
    return ad.AnnData(x, obs=cells.obs.copy(), var=pd.DataFrame(index=["other1", "other2", *cells.var_names]))


def tiny_model(adata: ad.AnnData, **setup):
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, condition_keys=["cell_type"], **setup)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=1, num_timesteps=100, latent_dim=8)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           warmup_steps=2).train(3)
    return model


@pytest.fixture(scope="module")
def trained():
    adata = counts_cells()
    return adata, tiny_model(adata)


def run(model, cells, **kw):
    kw.setdefault("steps", 10)
    return denoise(model, cells, progress=False, **kw)


@pytest.mark.parametrize("name, value", [
    ("n_samples", 0), ("n_samples", -1), ("n_samples", 1.5), ("n_samples", "2"),
    ("strength", "0.3"), ("strength", None), ("strength", True), ("strength", float("nan")),
    ("likelihood_weight", float("nan")), ("likelihood_weight", -1.0), ("likelihood_weight", float("inf")),
    ("steps", 1.5), ("batch_size", 0), ("seed", -1), ("seed", 2**32), ("seed", 1.5), ("seed", None),
    ("key_added", ""), ("key_added", "a/b")])
def test_bad_settings_are_refused_by_name(trained, name, value):
    """Before: n_samples 0, 1.5 or -1 and steps 1.5 failed deep in torch (RuntimeError, TypeError on a
    reshape), strength as text a TypeError on '<'; a NaN or negative likelihood_weight and a seed
    outside [0, 2**32) (2**32 drew seed 0's noise, -1 seed 2**32-1's, 1.5 seed 1's) ran silently, a
    NaN weight to all-NaN values; key_added '' or 'a/b' wrote an .h5ad that cannot be read back."""
    adata, model = trained
    with pytest.raises(ValueError, match=name):
        run(model, adata[:5].copy(), method="posterior", **{name: value})


def test_same_seed_same_cells_other_seed_other_cells_and_integral_floats_accepted(trained):
    adata, model = trained
    cells = adata[:20].copy()
    first, again, other = (run(model, cells, seed=s).layers["scidiff_denoised"] for s in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    two = run(model, cells, n_samples=2.0, seed=np.int64(3))  # an integral float and a numpy integer
    np.testing.assert_array_equal(two.layers["scidiff_denoised"], run(model, cells, n_samples=2, seed=3)
                                  .layers["scidiff_denoised"])
    assert two.uns["scidiff_denoise"]["n_samples"] == 2 and two.uns["scidiff_denoise"]["seed"] == 3


def test_every_matrix_form_of_the_same_counts_denoises_alike(trained, tmp_path):
    """CSR, CSC, integer, float64, a view, a backed file, genes reversed or among others: the same
    cells, the same denoised values as dense float32 counts over the model's genes in its order."""
    adata, model = trained
    cells = adata[:20].copy()
    ref = run(model, cells, method="posterior")
    x = cells.X
    cells.write_h5ad(tmp_path / "cells.h5ad")
    forms = {"csr": ad.AnnData(sp.csr_matrix(x), obs=cells.obs, var=cells.var),
             "csc": ad.AnnData(sp.csc_matrix(x), obs=cells.obs, var=cells.var),
             "int": ad.AnnData(x.astype(np.int64), obs=cells.obs, var=cells.var),
             "float64": ad.AnnData(x.astype(np.float64), obs=cells.obs, var=cells.var),
             "view": adata[:20], "reversed": cells[:, cells.var_names[::-1]].copy(),
             "superset": with_other_genes(cells),
             "backed": ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")}
    for name, form in forms.items():
        out = run(model, form, method="posterior")
        assert list(out.var_names) == list(ref.var_names) and list(out.obs_names) == list(ref.obs_names), name
        np.testing.assert_allclose(out.layers["scidiff_denoised"], ref.layers["scidiff_denoised"], atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(out.X, ref.X, atol=1e-5, err_msg=name)


def test_the_neighbour_graph_and_where_the_cells_were_read_are_kept(trained, tmp_path):
    """Before: ``uns['neighbors']`` was kept but the graph it describes (``obsp``) was dropped, so
    scanpy's leiden/umap on the output asked for pp.neighbors again; and ``uns['scidiff_denoise']``
    said neither which matrix the cells were read from (chosen automatically without layer=) nor
    which layer holds the denoised values."""
    adata, model = trained
    cells = adata[:20].copy()
    lognorm = np.log1p(cells.X / cells.X.sum(1, keepdims=True) * 1e4)
    cells.layers["counts"] = cells.X.copy()
    cells.raw = cells.copy()
    cells.X = lognorm
    graph = sp.random(20, 20, density=0.2, format="csr", random_state=0, dtype=np.float32)
    cells.obsp["connectivities"], cells.uns["neighbors"] = graph, {"params": {"n_neighbors": 5}}
    before = cells.copy()
    for kw, where in (({}, "X"), ({"layer": "counts"}, "layers/counts"), ({"use_raw": True}, "raw/X")):
        out = run(model, cells, key_added="den", **kw)
        assert (out.obsp["connectivities"] != graph).nnz == 0 and "neighbors" in out.uns
        np.testing.assert_allclose(out.X, lognorm, atol=1e-5)  # the input's log1p values
        written = tmp_path / "out.h5ad"
        out.write_h5ad(written)
        back = ad.read_h5ad(written)
        assert back.uns["scidiff_denoise"]["input"] == where and back.uns["scidiff_denoise"]["key_added"] == "den"
        np.testing.assert_array_equal(back.layers["den"], out.layers["den"])
    # the input is not changed
    np.testing.assert_array_equal(cells.X, before.X)
    assert list(cells.layers) == ["counts"] and "scidiff_denoise" not in cells.uns


def test_kang_cells_denoised_from_the_models_counts_layer_keep_their_graph():
    """Real Kang cells (log1p in X, counts in layers['counts'], a neighbour graph): a model trained
    on the counts layer reads it without layer=, says so in uns, and the output keeps obsp."""
    kang = ad.read_h5ad(shared_file("kang_ifnb_pbmc.h5ad"))
    genes = kang.var_names[np.argsort(-np.asarray(kang.layers["counts"].sum(0)).ravel())[:40]]
    model = tiny_model(kang[:300, genes].copy(), layer="counts")
    cells = kang[:30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rescaling of X's log1p values: the counts are read
        out = run(model, cells)
    assert out.uns["scidiff_denoise"]["input"] == "layers/counts"
    assert set(out.obsp) == set(kang.obsp) and "neighbors" in out.uns
    np.testing.assert_array_equal(out.obsp["distances"].toarray(), cells.obsp["distances"].toarray())
    library = np.asarray(cells.layers["counts"].sum(1))  # over all the file's genes, as scanpy's normalize_total
    expected = np.log1p(cells[:, genes].layers["counts"].toarray() / library * 1e4)
    np.testing.assert_allclose(out.X, expected, atol=1e-4)


def _cli(model, data, out):
    return main(["denoise", "--model", str(model), "--data", str(data), "--out", str(out)])


def test_cli_refuses_an_out_that_is_the_data_or_the_model(trained, tmp_path, capsys):
    """Before: ``--out`` the ``--data`` file replaced it with the denoised cells (the model's genes
    only, its counts layer gone), and ``--out`` the model's checkpoint replaced the model."""
    adata, model = trained
    run_dir = tmp_path / "run"
    save_model(model, run_dir)
    data = tmp_path / "cells.h5ad"
    cells = with_other_genes(adata[:20])
    cells.layers["counts"] = cells.X.copy()
    cells.write_h5ad(data)
    checkpoint = (run_dir / "model.pt").read_bytes()
    for model_arg, out, flag in ((run_dir, data, "--data"), (run_dir, run_dir / "model.pt", "--model"),
                                 (run_dir / "model.pt", run_dir / "model.pt", "--model")):
        assert _cli(model_arg, data, out) == 2
        assert f"is the {flag} file" in capsys.readouterr().err
    back = ad.read_h5ad(data)
    assert back.n_vars == GENES + 2 and "counts" in back.layers and "scidiff_denoised" not in back.layers
    assert (run_dir / "model.pt").read_bytes() == checkpoint
    assert _cli(run_dir, data, tmp_path / "den.h5ad") == 0
    assert ad.read_h5ad(tmp_path / "den.h5ad").n_vars == GENES


def test_binomial_split_refuses_infinite_counts():
    """Before: inf passed the integer check (inf == round(inf)) and numpy failed with 'n < 0'."""
    counts = np.array([[1.0, np.inf], [2.0, 3.0]])
    for form in (counts, sp.csr_matrix(counts)):
        with pytest.raises(ValueError, match="non-negative integer counts"):
            binomial_split(form, 0.5)
    a, b = binomial_split(np.array([[4, 0], [2, 7]]), 0.5, seed=0)
    np.testing.assert_array_equal(a + b, [[4, 0], [2, 7]])


def test_scores_refuse_matrices_of_another_shape():
    """Before: a denoised matrix of one gene (or one cell) broadcast against the test counts and
    gave a score of nothing in particular."""
    counts = np.random.default_rng(0).poisson(3, (20, 5)).astype(np.float64)
    for denoised in (np.ones((20, 1)), np.ones((1, 5)), np.ones((20, 4))):
        for score in (lambda d: mcv_scores(d, counts, counts), lambda d: mse(d, counts),
                      lambda d: poisson_loss(d, counts, counts)):
            with pytest.raises(ValueError, match="same shape"):
                score(denoised)
    with pytest.raises(ValueError, match="same shape"):
        poisson_loss(counts, counts[:, :4], counts)
    # the closed form on matching shapes: mean(lambda - y log(lambda + 1e-6)), lambda rescaled by sum(B)/sum(A)
    assert poisson_loss(np.full((1, 2), 2.0), np.ones((1, 2)), np.array([[3.0, 1.0]])) == pytest.approx(
        np.mean([4.0 - 3.0 * np.log(4.0 + 1e-6), 4.0 - np.log(4.0 + 1e-6)]))


def test_best_pca_denoiser_names_a_grid_that_fits_no_component_count():
    """Before: counts of two genes left every k of the grid out and it failed with TypeError; a
    misspelt score failed with a bare KeyError after the first fit."""
    a, b = binomial_split(np.random.default_rng(0).poisson(5, (30, 2)), 0.5)
    with pytest.raises(ValueError, match="no number of components"):
        best_pca_denoiser(a, b)
    a, b = binomial_split(np.random.default_rng(0).poisson(5, (30, 8)), 0.5)
    with pytest.raises(ValueError, match="score must be"):
        best_pca_denoiser(a, b, score="MSE")
    k, _, results = best_pca_denoiser(a, b, grid=(2, 3), score="poisson_loss")
    assert k == min(results, key=lambda j: results[j]["poisson_loss"])


def test_counts_from_log_takes_the_library_as_counts_sum_gives_it():
    """Before: a column of totals (``counts.sum(1, keepdims=True)``) broadcast to cells x cells x
    genes, and a sparse matrix's ``sum(1)`` (an np.matrix) failed with 'shapes not aligned'."""
    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]]))
    log = np.log1p(counts.toarray() / counts.sum(1).A * 1e4)
    expected = counts.toarray()  # the round trip: expm1(log1p(c / total * 1e4)) / 1e4 * total
    for library in (counts.sum(1), counts.toarray().sum(1, keepdims=True), counts.toarray().sum(1)):
        np.testing.assert_allclose(counts_from_log(log, library), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="one total per cell"):
        counts_from_log(log, np.ones(3))
