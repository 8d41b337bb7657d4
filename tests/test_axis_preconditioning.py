"""Per-axis preconditioning (``ScIDiffModel(axis_sigma_data=True)``): each latent axis's own
standard deviation in EDM's coefficients, so that ``c_skip x_t`` is the exact posterior mean of a
Gaussian with the data's per-axis variances; fitted with the latent (in memory and streamed
alike), kept by checkpoints, and taken unchanged by the engine and the ONNX export."""
import numpy as np
import pytest
import torch

from scidiff.data import CellData
from scidiff.data.spec import DataSpec
from scidiff.engine import SamplingEngine
from scidiff.models import Preconditioning, ScIDiffModel
from scidiff.training import load_model, save_model

SCALES = torch.logspace(-1.5, 0.8, 12)  # sd 0.03 to 6.3: the principal axes differ widely


def cells(n=300, seed=0) -> CellData:
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) % 2
    x = torch.randn(n, 12, generator=g) * SCALES + groups[:, None] * 0.5
    spec = DataSpec(gene_names=[f"g{i}" for i in range(12)], categorical={"c": ["a", "b"]})
    import pandas as pd
    obs = pd.DataFrame({"c": ["ab"[int(k)] for k in groups]}, index=[f"c{i}" for i in range(n)])
    return CellData(x, {"c": groups}, spec, obs)


def model_of(data, **kw) -> ScIDiffModel:
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, latent_dim=5, hidden_dim=32, num_layers=2, num_timesteps=100,
                                   conditioning_dim=16, axis_sigma_data=True, **kw).eval()
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised layers too)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_coefficients_are_each_axis_own_and_c_skip_is_the_gaussian_posterior_mean():
    ab = torch.linspace(0.999, 0.001, 100)
    sd = torch.tensor([0.3, 1.0, 4.0])
    t = torch.tensor([5, 50, 95])
    per_axis = Preconditioning.at(ab, t, sd)
    assert per_axis.c_in.shape == (3, 3) and per_axis.sqrt_ab.shape == (3, 1)
    for k in range(3):  # column k is the one-number preconditioning at sd_k
        one = Preconditioning.at(ab, t, float(sd[k]))
        for a, b in zip(per_axis[:3], one[:3]):
            torch.testing.assert_close(a[:, k:k + 1], b)
    # E[x0 | x_t] for x0 ~ N(0, sd^2) per axis: sqrt(ab) sd^2 / (ab sd^2 + 1 - ab) x_t
    a = ab[t].unsqueeze(-1)
    torch.testing.assert_close(per_axis.c_skip, a.sqrt() * sd**2 / (a * sd**2 + 1 - a))
    # the engine's per-step rows keep a tensor per axis, floats for sqrt(alpha_bar)
    row = per_axis.rows()[1]
    assert isinstance(row.sqrt_ab, float) and torch.equal(row.c_in, per_axis.c_in[1])


def test_each_axis_sd_is_the_cells_own_in_memory_and_streamed():
    data = cells()
    model = model_of(data)
    with torch.no_grad():
        z = model.encode(data.x)
    torch.testing.assert_close(model.sigma_data_axes, z.std(0), rtol=1e-4, atol=1e-5)
    assert model.sigma_data_axes[0] > 2 * model.sigma_data_axes[-1]  # the axes really differ
    streamed = ScIDiffModel(gene_dim=12, data_spec=data.spec, latent_dim=5, hidden_dim=32, num_layers=2,
                            num_timesteps=100, conditioning_dim=16, axis_sigma_data=True)
    x = data.x.double()
    cov = torch.cov(x.T, correction=0)
    streamed.fit_latent_from_moments(x.mean(0), cov, len(x))
    torch.testing.assert_close(streamed.sigma_data_axes, model.sigma_data_axes, rtol=1e-4, atol=1e-5)
    # a model without it keeps one number, and its loss weight is c_out
    plain = ScIDiffModel(gene_dim=12, data_spec=data.spec, latent_dim=5, hidden_dim=32, num_layers=2,
                         num_timesteps=100, conditioning_dim=16)
    assert not plain.axis_sigma_data and not hasattr(plain, "sigma_data_axes")
    t = torch.tensor([3, 60])
    torch.testing.assert_close(plain.loss_scale(t), plain.precondition(t).c_out)
    # per axis: the geometric mean of each axis's c_out and the shared one's
    shared = Preconditioning.at(model.alphas_cumprod, t, model.sigma_data).c_out
    torch.testing.assert_close(model.loss_scale(t) ** 2, model.precondition(t).c_out * shared)


def test_training_step_and_checkpoint_round_trip(tmp_path):
    from scidiff.training import ScIDiffTrainer

    data = cells()
    model = model_of(data)
    ScIDiffTrainer(model, data.loader(batch_size=100, seed=0), device="cpu", early_stopping_patience=None,
                   progress=False, seed=0).train(num_epochs=2)
    model.eval()
    save_model(model, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert back.axis_sigma_data and back.config()["axis_sigma_data"]
    torch.testing.assert_close(back.sigma_data_axes, model.sigma_data_axes)
    a = model.sample(6, {"c": "b"}, seed=1, return_expression=False)
    torch.testing.assert_close(back.sample(6, {"c": "b"}, seed=1, return_expression=False), a)


@pytest.mark.parametrize("sampler,steps", [("ddim", 8), ("dpmpp_2m", 6)])
def test_fp32_engine_reproduces_model_sample(sampler, steps):
    model = model_of(cells())
    engine = SamplingEngine(model, sampler, steps, dtype=torch.float32)
    torch.testing.assert_close(engine.sample(7, {"c": "a"}, seed=2, observed=False),
                               model.sample(7, {"c": "a"}, sampler=sampler, steps=steps, seed=2, observed=False),
                               atol=2e-5, rtol=2e-5)


def test_onnx_export_equals_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from scidiff.export.onnx import export_onnx
    from scidiff.export.runtime import OnnxSampler

    model = model_of(cells())
    out = tmp_path / "axes.onnx"
    assert export_onnx(model, out, steps=4)["max_abs_error"] < 1e-4
    x_T = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    got = OnnxSampler(out, threads=1).sample(8, {"c": "b"}, x_T=x_T.numpy(), sampler="ddim", steps=4, output="latent")
    with torch.no_grad():  # model.sample decodes to genes; the ONNX sampler stops in the latent
        expected = model.encode(model.sample(8, {"c": "b"}, sampler="ddim", steps=4, return_expression=False,
                                             generator=torch.Generator().manual_seed(3))).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_the_config_switch_reaches_the_model():
    from scidiff.config import load_config

    assert load_config().model.model_kwargs()["axis_sigma_data"] is False  # off by default
    kwargs = load_config(overrides={"model": {"axis_sigma_data": True}}).model.model_kwargs()
    data = cells()
    assert ScIDiffModel.from_data(data, **{**kwargs, "hidden_dim": 16, "num_layers": 1, "latent_dim": 4}).axis_sigma_data
    # a gene-space model has no latent axes to precondition one by one
    assert not ScIDiffModel.from_data(data, **{**kwargs, "hidden_dim": 16, "num_layers": 1, "latent_dim": None}).axis_sigma_data
