import numpy as np
import pytest
import torch

import scidiff
from scidiff.models import BiologicalNoiseScheduler, ConditionEncoder, ScIDiffModel
from scidiff.training import load_model, save_model


def test_model_shapes_and_defaults():
    model = ScIDiffModel(gene_dim=30, hidden_dim=32, num_layers=2, num_timesteps=100)
    assert model.num_timesteps == 100 and model.scheduler.kind == "cosine"
    x = torch.randn(5, 30)
    out = model(x, torch.tensor([0, 10, 50, 99, 3]))
    assert out.shape == (5, 30)
    s = model.sample(4, seed=0)
    assert s.shape == (4, 30)
    torch.testing.assert_close(model.sample(4, seed=0), s)


def test_zero_initialised_network_is_the_optimal_linear_denoiser():
    """adaLN-Zero + zero output layer: at init F = 0, so the model returns c_skip * x_t, the
    posterior mean of x0 for x0 ~ N(0, sigma_data^2)."""
    model = ScIDiffModel(gene_dim=8, hidden_dim=16, num_layers=2, num_timesteps=1000, sigma_data=0.7)
    t = torch.tensor([100, 500])
    x = torch.randn(2, 8)
    ab = model.scheduler.alphas_cumprod[t].float().unsqueeze(-1)
    expected = ab.sqrt() * 0.49 / (ab * 0.49 + 1 - ab) * x
    torch.testing.assert_close(model(x, t), expected)


def test_custom_scheduler_is_used():
    sched = BiologicalNoiseScheduler(num_timesteps=200, sparsity_factor=0.8)
    model = ScIDiffModel(gene_dim=10, noise_scheduler=sched, hidden_dim=16, num_layers=1)
    assert model.num_timesteps == 200
    torch.testing.assert_close(model.alphas_cumprod, sched.alphas_cumprod.float())


def test_condition_encoder_null_and_dropout():
    enc = ConditionEncoder({"cell_type": 3}, ["dose"], dim=8)
    b = 4
    null = enc({}, b, "cpu")
    explicit = enc({**enc.null_condition(b), "dose": torch.full((b,), float("nan"))}, b, "cpu")
    torch.testing.assert_close(null, explicit)
    cond = {"cell_type": torch.tensor([0, 1, 2, 0]), "dose": torch.tensor([0.0, 1.0, 10.0, 100.0])}
    assert not torch.allclose(enc(cond, b, "cpu"), null)
    dropped = enc.drop(cond, 1.0)
    torch.testing.assert_close(enc(dropped, b, "cpu"), null)
    assert enc.drop(cond, 0.0)["cell_type"].tolist() == [0, 1, 2, 0]
    with pytest.raises(KeyError, match="unknown condition key"):
        enc({"drug": torch.tensor([0])}, 1, "cpu")


def test_sample_with_labels_and_errors(kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=40, condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100)
    x = model.sample(6, {"cell_type": "B", "condition": "stimulated"}, steps=5, seed=1)
    assert x.shape == (6, 40) and float(x.min()) >= 0  # log1p expression, clipped at 0
    codes = {"cell_type": torch.tensor([data.spec.categorical["cell_type"].index("B")])}
    torch.testing.assert_close(model.sample(6, codes, steps=5, seed=1), model.sample(6, {"cell_type": "B"}, steps=5, seed=1))
    with pytest.raises(ValueError, match=r"unknown value 'Neuron' for condition 'cell_type'; known values: \["):
        model.sample(2, {"cell_type": "Neuron"})
    with pytest.raises(ValueError, match="unknown sampler"):
        model.sample(2, sampler="euler")
    # guidance runs both halves and differs from the plain conditional model
    g = model.sample(6, {"cell_type": "B"}, steps=5, seed=1, guidance_scale=2.0)
    assert g.shape == (6, 40)


def test_original_conditioning_call_with_tensor_codes():
    model = ScIDiffModel(gene_dim=12, hidden_dim=16, num_layers=1, covariates={"drug": 4, "cell_type": 3},
                         continuous_covariates=["dose"])
    out = model.sample(batch_size=10, conditioning={"drug": torch.tensor([2]), "dose": torch.tensor([1.0]),
                                                    "cell_type": torch.tensor([1])}, steps=3)
    assert out.shape == (10, 12)
    with pytest.raises(ValueError, match="must lie in"):
        model.sample(2, {"drug": torch.tensor([7])})


def test_latent_model_encodes_and_decodes_on_its_span(kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=60)
    model = ScIDiffModel.from_data(data, latent_dim=10, hidden_dim=32, num_layers=1)
    z = model.encode(data.x)
    assert z.shape == (len(data), 10)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)
    # decode(encode(x)) is the projection onto the top principal axes: the PCA reconstruction
    from sklearn.decomposition import PCA

    pca = PCA(10, svd_solver="full").fit(data.x.numpy())
    ref = pca.inverse_transform(pca.transform(data.x.numpy()))
    np.testing.assert_allclose(model.decode(z).numpy(), ref, atol=2e-4)
    assert model.sample(3, steps=3, seed=0).shape == (3, 60)


def test_checkpoint_round_trip_gives_the_same_samples(tmp_path, kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=40, condition_keys=["cell_type"])
    model = ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=8)
    for p in model.parameters():  # make the weights non-trivial
        torch.nn.init.normal_(p, std=0.05)
    path = save_model(model, tmp_path / "run")
    assert path.endswith("model.pt")
    again = load_model(tmp_path / "run")
    assert again.data_spec == model.data_spec and again.config() == model.config()
    a = model.sample(5, {"cell_type": "NK"}, steps=10, seed=7)
    b = again.sample(5, {"cell_type": "NK"}, steps=10, seed=7)
    torch.testing.assert_close(a, b)
    # nothing but tensors and plain values inside: loads with weights_only
    torch.load(path, weights_only=True)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "missing")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="junk.pt.*not a readable scidiff checkpoint"):
        load_model(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a scidiff checkpoint"):
        load_model(foreign)


def test_checkpoint_from_a_different_gene_set(tmp_path, kang_small):
    data = scidiff.setup_anndata(kang_small, n_top_genes=40)
    model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1)
    save_model(model, tmp_path / "a")
    other = scidiff.setup_anndata(kang_small, n_top_genes=50)
    with pytest.raises(ValueError, match="different gene set"):
        load_model(tmp_path / "a", genes=other.spec.gene_names)
    assert load_model(tmp_path / "a", genes=data.spec.gene_names).gene_dim == 40
    # and cells lacking the model's genes cannot be brought into its space
    missing = kang_small[:, [g for g in kang_small.var_names if g not in data.spec.gene_names[:3]]].copy()
    with pytest.raises(KeyError, match="not in the data"):
        scidiff.transform_like(load_model(tmp_path / "a").data_spec, missing)
