"""Denoising: binomial thinning moments, the denoiser against known sources, bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scidiff
from scidiff.tasks.denoise import binomial_split, denoise
from scidiff.tasks.perturb import perturb
from scidiff.evaluation.denoising import knn_denoiser, mcv_scores, pca_denoiser, poisson_loss, raw_denoiser


def test_binomial_thinning_moments(kang):
    counts = kang.layers["counts"]
    a, b = binomial_split(counts, 0.5, seed=0)
    assert sp.issparse(a) and sp.issparse(b)
    np.testing.assert_array_equal((a + b).toarray(), counts.toarray())  # every molecule goes to one half
    assert a.min() >= 0 and b.min() >= 0 and np.all(a.data == np.round(a.data))
    x, ad_ = counts.toarray(), a.toarray()
    for k in (1, 4, 10):
        sel = x == k
        # Binomial(k, 1/2): mean k/2, variance k/4
        assert ad_[sel].mean() == pytest.approx(k / 2, rel=0.02)
        assert ad_[sel].var() == pytest.approx(k / 4, rel=0.05)
    a3, _ = binomial_split(counts.toarray()[:50], 0.3, seed=1)
    assert a3.sum() / counts[:50].sum() == pytest.approx(0.3, rel=0.02)
    with pytest.raises(ValueError, match="integer counts"):
        binomial_split(kang.X[:10], 0.5)


def test_mcv_scores_rank_known_denoisers():
    """On Poisson data from known profiles, the true rates beat every baseline and raw is worst."""
    rng = np.random.default_rng(0)
    profiles = rng.dirichlet(np.ones(60) * 0.3, size=3)
    labels = rng.integers(0, 3, 300)
    lib = rng.integers(500, 1500, 300)
    counts = rng.poisson(profiles[labels] * lib[:, None])
    a, b = binomial_split(counts, 0.5, seed=0)
    truth = profiles[labels] * a.sum(1, keepdims=True)
    scores = {name: mcv_scores(d, a, b) for name, d in
              {"truth": truth, "raw": raw_denoiser(a), "pca": pca_denoiser(a, 3), "knn": knn_denoiser(a, 15)}.items()}
    # the true rates minimise the expected Poisson loss (log-space MSE rewards shrinkage past the
    # truth, by Jensen's inequality, so there only raw counts are sure to be worst)
    assert scores["truth"]["poisson_loss"] < min(scores[m]["poisson_loss"] for m in ("raw", "pca", "knn"))
    for metric in ("poisson_loss", "mse"):
        assert scores["raw"][metric] > max(scores[m][metric] for m in ("truth", "pca", "knn"))
    # Poisson loss closed form on a single entry: lambda - y log(lambda)
    assert poisson_loss(np.array([[2.0]]), np.array([[1.0]]), np.array([[3.0]])) == pytest.approx(
        6.0 - 3.0 * np.log(6.0 + 1e-6))


@pytest.fixture(scope="module")
def synthetic_model():
    """Counts from three known expression profiles; a small model trained on them."""
    rng = np.random.default_rng(1)
    genes = 40
    profiles = rng.dirichlet(np.ones(genes) * 0.5, size=3)
    labels = np.repeat(np.arange(3), 300)
    lib = rng.integers(800, 1600, len(labels))
    counts = rng.poisson(profiles[labels] * lib[:, None]).astype(np.float32)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame({"cell_type": [f"type{i}" for i in labels]},
                                                  index=[f"c{i}" for i in range(len(labels))]))
    adata.var_names = [f"g{i}" for i in range(genes)]
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, condition_keys=["cell_type"])
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=64, num_layers=2, num_timesteps=200, latent_dim=8)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           warmup_steps=20).train(60)
    return adata, model, profiles


def test_low_strength_keeps_a_clean_model_sample(synthetic_model):
    _, model, _ = synthetic_model
    x = model.sample(64, {"cell_type": "type1"}, steps=20, seed=0, observed=False).numpy()  # smooth: clean
    cells = ad.AnnData(X=np.expm1(x) * 10.0, obs=pd.DataFrame({"cell_type": ["type1"] * 64}))  # log1p-consistent
    cells.X = x
    cells.var_names = model.data_spec.gene_names
    out = denoise(model, cells, strength=0.02, steps=20, progress=False)
    change = np.abs(out.layers["scidiff_denoised"] - x).mean()
    # far below the spread between cells of the type
    assert change < 0.25 * np.abs(x - x.mean(0)).mean()


def test_heavily_thinned_cells_move_toward_their_source(synthetic_model):
    adata, model, profiles = synthetic_model
    rng = np.random.default_rng(5)
    idx = rng.choice(adata.n_obs, 60, replace=False)
    thin, _ = binomial_split(adata.X[idx], 0.1, seed=3)
    cells = ad.AnnData(X=thin.astype(np.float32), obs=adata.obs.iloc[idx].copy())
    cells.var_names = adata.var_names
    out = denoise(model, cells, strength=0.5, n_samples=2, progress=False)
    labels = cells.obs["cell_type"].str[-1].astype(int).to_numpy()
    source = np.log1p(profiles[labels] * 1e4)
    before = np.abs(out.X - source).mean()
    after = np.abs(out.layers["scidiff_denoised"] - source).mean()
    assert after < 0.6 * before
    # posterior sampling with the count likelihood runs on the same counts and also helps
    post = denoise(model, cells, strength=0.5, method="posterior", likelihood_weight=1.0, progress=False)
    assert np.abs(post.layers["scidiff_denoised"] - source).mean() < 0.6 * before


def test_denoise_bad_input_and_zero_count_cells(synthetic_model):
    adata, model, _ = synthetic_model
    log_data = adata[:20].copy()
    log_data.X = np.log1p(log_data.X / log_data.X.sum(1, keepdims=True) * 1e4)
    with pytest.raises(ValueError, match="log-normalised values; the posterior method needs raw counts"):
        denoise(model, log_data, method="posterior", progress=False)
    with pytest.raises(KeyError, match="g5"):
        denoise(model, adata[:10, [g for g in adata.var_names if g != "g5"]].copy(), progress=False)
    with_zero = adata[:10].copy()
    with_zero.X[3] = 0
    out = denoise(model, with_zero, method="posterior", progress=False)
    assert out.n_obs == 10 and list(out.obs_names) == list(with_zero.obs_names)
    assert np.isfinite(out.layers["scidiff_denoised"]).all()
    with pytest.raises(ValueError, match="strength"):
        denoise(model, adata[:5], strength=0.0)


def test_denoised_and_fresh_cells_do_not_depend_on_the_batching(synthetic_model):
    """Each cell's noise is keyed by its row (scidiff.models.cell_draws): denoised cells, and fresh
    cells of a population prediction (this model keeps no reference cells: their mean keeping is
    fitted on the input rows' own fresh cells), come out the same in batches of 7 as in one."""
    adata, model, _ = synthetic_model
    cells = adata[:50].copy()
    for method in ("sdedit", "posterior"):
        whole = denoise(model, cells, method=method, n_samples=2, steps=10, progress=False)
        parts = denoise(model, cells, method=method, n_samples=2, steps=10, progress=False, batch_size=7)
        np.testing.assert_allclose(parts.layers["scidiff_denoised"], whole.layers["scidiff_denoised"], atol=1e-5)
    fresh = [perturb(model, cells, {"cell_type": "type2"}, method="population", steps=10, progress=False,
                     batch_size=size).X for size in (4096, 7)]
    assert model.effects is None and (fresh[0] > 0).any()
    np.testing.assert_allclose(fresh[1], fresh[0], atol=1e-5)
