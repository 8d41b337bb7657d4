"""ONNX export and the torch-free onnxruntime sampler, on a model trained on real Kang cells."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from scidiff.cli import main  # noqa: E402
from scidiff.data import DataSpec  # noqa: E402
from scidiff.export import runtime  # noqa: E402
from scidiff.export.onnx import (ConditionTableDenoiser, decoder_path, example_inputs, export_onnx,  # noqa: E402
                                 sidecar_path, torch_reference)
from scidiff.export.runtime import OnnxSampler, ddim, dpmpp_2m  # noqa: E402
from scidiff.models import ScIDiffModel  # noqa: E402
from scidiff.training import save_model  # noqa: E402
from scidiff.tasks.generate import expression_note  # noqa: E402
from scidiff.diffusion.guidance import classifier_free_guidance  # noqa: E402
from scidiff.diffusion.plans import timesteps  # noqa: E402
from scidiff.diffusion.samplers import ddim as torch_ddim  # noqa: E402


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(sess, inputs):
    return {i.name: v.numpy() for i, v in zip(sess.get_inputs(), inputs)}


def test_export_writes_the_graph_and_everything_a_sampler_needs(kang_onnx):
    model, path = kang_onnx
    onnx.checker.check_model(str(path))
    meta = json.loads(open(sidecar_path(path)).read())
    spec = model.data_spec
    assert meta["genes"] == spec.gene_names and len(meta["genes"]) == 100
    assert meta["normalisation"]["gene_offset"] == pytest.approx(spec.gene_offset)
    assert meta["normalisation"]["gene_scale"] == pytest.approx(spec.gene_scale)
    vocab = {c["key"]: c["labels"] for c in meta["covariates"]}
    assert vocab == {"cell_type": spec.categorical["cell_type"], "condition": spec.categorical["condition"]}
    np.testing.assert_array_equal(meta["schedule"]["alphas_cumprod"], model.scheduler.alphas_cumprod.numpy())
    assert meta["sampling"]["steps"] == 8 and meta["sampling"]["sampler"] == "ddim"
    assert meta["scidiff_version"] and meta["export_check"]["max_abs_error"] < 1e-5
    with np.load(decoder_path(path)) as dec:
        np.testing.assert_array_equal(dec["basis"], model.latent_basis.numpy())
        np.testing.assert_array_equal(dec["mean"], model.latent_mean.numpy())
        np.testing.assert_array_equal(dec["scale"], model.latent_scale.numpy())
        # the fitted detection model's tables, named by the sidecar
        assert meta["detection"]["arrays"] == ["detection_edges", "detection_centres", "detection_rate",
                                               "detection_levels", "detection_capture"]
        assert (meta["detection"]["bins"], meta["detection"]["quantiles"]) == (model.detection.bins, 32)
        assert model.detection.edges.shape[1] == model.detection.bins + 1  # sized to the training cells
        np.testing.assert_array_equal(dec["detection_edges"], model.detection.edges.numpy())
        np.testing.assert_array_equal(dec["detection_centres"], model.detection.centres.numpy())
        np.testing.assert_array_equal(dec["detection_rate"], model.detection.detection.numpy())
        np.testing.assert_array_equal(dec["detection_levels"], model.detection.levels.numpy())
        assert float(dec["detection_capture"]) == float(model.detection.capture) > 0
    # the batch dimension is dynamic, and no temporary files are left behind
    sess = _session(path)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert isinstance(shapes["x_t"][0], str) and shapes["x_t"][1] == 16 and isinstance(shapes["t"][0], str)
    assert sorted(os.listdir(path.parent)) == ["model.decoder.npz", "model.json", "model.onnx"]


@pytest.mark.parametrize("b,k,w", [(64, 64, 1.0), (64, 64, 2.5), (96, 3, 1.0), (33, 5, 0.0), (1, 1, 1.5)])
def test_onnx_matches_torch_within_1e5(kang_onnx, b, k, w):
    model, path = kang_onnx
    sess = _session(path)
    inputs = example_inputs(model, b, k, w, seed=b + k)
    expected = torch_reference(model, inputs).numpy()
    got = sess.run(["x0"], _feed(sess, inputs))[0]
    assert got.shape == (b, 16)
    assert np.abs(expected).max() > 0.3  # trained weights give non-trivial predictions
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_the_graph_is_the_models_denoiser_seam(kang_onnx):
    """With one table row per cell, the graph is exactly ``model(x_t, t, cond)`` and the guided
    graph is :func:`classifier_free_guidance` over it, with null codes for the unconditional half."""
    model, path = kang_onnx
    sess = _session(path)
    g = torch.Generator().manual_seed(1)
    b = 40
    x, t = torch.randn(b, 16, generator=g), torch.randint(0, 200, (b,), generator=g)
    cell, cond = torch.randint(0, 8, (b,), generator=g), torch.randint(0, 2, (b,), generator=g)
    with torch.no_grad():
        plain = model(x, t, {"cell_type": cell, "condition": cond}).numpy()
        null = model.condition_encoder.null_condition(b)
        guided = classifier_free_guidance(model, 3.0, null)(x, t, {"cell_type": cell, "condition": cond}).numpy()
    for w, expected in ((1.0, plain), (3.0, guided)):
        got = sess.run(["x0"], _feed(sess, (x, t, torch.arange(b), torch.full((b,), w), cell, cond)))[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_onnx_sampler_matches_the_torch_sampler(kang_onnx):
    """Same x_T: ``OnnxSampler`` (numpy + onnxruntime) vs ``ScIDiffModel.sample`` (torch), DDIM
    with and without guidance and DPM-Solver++(2M), on the smooth cells (the measurements draw
    from numpy's and torch's generators: test_runtime_measures_cells_by_default)."""
    model, path = kang_onnx
    sampler = OnnxSampler(path, threads=1)
    condition = {"cell_type": "B", "condition": "stimulated"}
    for name, steps, w in (("ddim", 6, 1.0), ("ddim", 4, 2.0), ("dpmpp_2m", 6, 1.5)):
        x_T = torch.randn(50, 16, generator=torch.Generator().manual_seed(7))
        expected = model.sample(50, condition, sampler=name, steps=steps, guidance_scale=w, observed=False,
                                generator=torch.Generator().manual_seed(7)).numpy()
        got = sampler.sample(50, condition, x_T=x_T.numpy(), steps=steps, guidance=w, sampler=name, observed=False,
                             output="arrays")
        assert got["X"].shape == (50, 100) and float(np.abs(expected).max()) > 1.0
        np.testing.assert_allclose(got["X"], expected, atol=2e-4, rtol=0)
        assert got["obs"]["cell_type"] == ["B"] * 50


def test_runtime_measures_cells_by_default(kang_onnx):
    """With the detection tables exported, cells come back measured unless asked otherwise: the
    model's measurement (DetectionModel.measure) of the smooth cells, on uniforms drawn from the
    seed's generator after the start points (the detection uniforms through the capture factor's
    copula), and sparse as the torch model's measured cells."""
    from scipy.special import ndtr

    model, path = kang_onnx
    sampler = OnnxSampler(path, threads=1)
    assert sampler.resolve_observed() and sampler.describe()["observed_available"]
    kwargs = dict(seed=0, steps=4, sampler="ddim", output="arrays")
    measured = sampler.sample(300, {"cell_type": "B"}, **kwargs)
    smooth = sampler.sample(300, {"cell_type": "B"}, observed=False, **kwargs)
    note = "log1p-normalised, measured through the detection model"
    assert measured["observed"] is True and measured["expression"] == note
    assert smooth["observed"] is False and smooth["expression"] == "log1p-normalised, smooth"
    z = sampler.sample(300, {"cell_type": "B"}, **{**kwargs, "output": "latent"})
    np.testing.assert_array_equal(smooth["X"], sampler.to_expression(sampler.decode(z)))
    rng = np.random.default_rng(0)
    rng.standard_normal((300, 16), dtype=np.float32)  # x_T
    rho = float(model.detection.capture)
    shared, own = rng.standard_normal(300, dtype=np.float32)[:, None], rng.standard_normal((300, 100), dtype=np.float32)
    detect_u = ndtr(np.float32(rho ** 0.5) * shared + np.float32((1 - rho) ** 0.5) * own).astype(np.float32)
    level_u = rng.random((300, 100), dtype=np.float32)
    cells = torch.from_numpy(sampler.to_expression(sampler.decode(z), clip=False))
    expected = model.detection.measure(cells, torch.from_numpy(detect_u), torch.from_numpy(level_u)).numpy()
    np.testing.assert_allclose(measured["X"], expected, rtol=0, atol=1e-6)
    torch_zeros = float((model.sample(300, {"cell_type": "B"}, sampler="ddim", steps=4, seed=0) == 0).float().mean())
    zeros = float((measured["X"] == 0).mean())
    assert abs(zeros - torch_zeros) < 0.05 and zeros > float((smooth["X"] == 0).mean()) + 0.3
    a = sampler.sample(5, {"cell_type": "B"}, **{**kwargs, "output": "anndata"})
    assert a.uns["scidiff"]["observed"] and "detection model" in a.uns["scidiff"]["expression"]


def test_an_export_without_detection_tables_gives_smooth_cells(kang_onnx, tmp_path):
    """An export from before the detection tables (or of a model without a fitted detection
    model): smooth cells by default, and asking for measured ones is an error that says why."""
    _, path = kang_onnx
    for name in ("model.onnx", "model.json", "model.decoder.npz"):
        shutil.copy(path.parent / name, tmp_path / name)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["detection"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    old, new = OnnxSampler(tmp_path / "model.onnx", threads=1), OnnxSampler(path, threads=1)
    assert not old.resolve_observed() and not old.describe()["observed_available"]
    got = old.sample(6, {"cell_type": "B"}, seed=2, steps=3, output="arrays")
    assert got["observed"] is False and got["expression"].endswith("smooth")
    np.testing.assert_array_equal(got["X"], new.sample(6, {"cell_type": "B"}, seed=2, steps=3, observed=False,
                                                       output="arrays")["X"])
    with pytest.raises(ValueError, match="need a detection model, and the export 'model.json' has none"):
        old.sample(2, observed=True)


def test_stochastic_ddim_matches_torch_with_the_same_noise(kang_onnx):
    model, path = kang_onnx
    sampler = OnnxSampler(path, threads=1)
    batch = sampler.prepare(20, {"cell_type": ["B", "NK"] * 10, "condition": "control"}, seed=3, eta=1.0)
    steps = 5
    noise = [batch.noise(i) for i in range(steps)]
    batch.noise = lambda i: noise[i]
    got = sampler.run(batch, "ddim", steps, eta=1.0)
    vocab = model.data_spec.categorical
    cond = {"cell_type": torch.tensor([vocab["cell_type"].index("B"), vocab["cell_type"].index("NK")] * 10),
            "condition": torch.full((20,), vocab["condition"].index("control"))}
    expected = torch_ddim(model, torch.from_numpy(batch.x_T), model.scheduler, steps, eta=1.0, cond=cond,
                          noise=[torch.from_numpy(n) for n in noise]).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    assert len(batch.guidance) == 2  # two distinct conditions -> a two-row condition table


def test_seed_reproduces_and_anndata_is_returned(kang_onnx):
    _, path = kang_onnx
    sampler = OnnxSampler(path, threads=1)
    a = sampler.sample(12, {"cell_type": "CD14+Mono"}, seed=5, sampler="dpmpp_2m", steps=6)
    b = sampler.sample(12, {"cell_type": "CD14+Mono"}, seed=5, sampler="dpm-solver++", steps=6)
    c = sampler.sample(12, {"cell_type": "CD14+Mono"}, seed=6, sampler="dpmpp_2m", steps=6)
    np.testing.assert_array_equal(a.X, b.X)
    assert np.abs(a.X - c.X).max() > 0.1
    assert list(a.var_names) == sampler.genes and a.X.min() >= 0
    assert list(a.obs["cell_type"]) == ["CD14+Mono"] * 12
    assert a.uns["scidiff"]["sampler"] == "dpmpp_2m" and a.uns["scidiff"]["seed"] == 5


def test_io_binding_path_gives_the_same_cells(kang_onnx):
    _, path = kang_onnx
    plain = OnnxSampler(path, threads=1, io_binding=False)
    bound = OnnxSampler(path, threads=1, io_binding=True)
    kwargs = dict(seed=11, steps=5, guidance=1.5, output="arrays")
    np.testing.assert_allclose(bound.sample(9, {"condition": "stimulated"}, **kwargs)["X"],
                               plain.sample(9, {"condition": "stimulated"}, **kwargs)["X"], atol=1e-6)


def test_condition_errors_name_the_key_and_the_labels(kang_onnx):
    _, path = kang_onnx
    sampler = OnnxSampler(path, threads=1)
    with pytest.raises(KeyError, match="unknown condition key 'tissue'.*cell_type"):
        sampler.sample(2, {"tissue": "lung"})
    with pytest.raises(ValueError, match="unknown value 'Neuron' for condition 'cell_type'; known values"):
        sampler.sample(2, {"cell_type": "Neuron"})
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sampler.sample(2, sampler="euler")
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 200\]"):
        sampler.sample(2, steps=500)
    with pytest.raises(ValueError, match="3 values for 2 cells"):
        sampler.sample(2, {"cell_type": ["B", "NK", "B"]})
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):  # it was ignored
        sampler.sample(2, sampler="dpmpp_2m", eta=0.5)
    assert sampler.resolve(sampler="dpmpp_2m", eta=0)["eta"] == 0.0


def test_files_that_do_not_match_are_refused(kang_onnx, tmp_path):
    _, path = kang_onnx
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        OnnxSampler(tmp_path / "absent.onnx")
    for name in ("model.onnx", "model.json", "model.decoder.npz"):
        shutil.copy(path.parent / name, tmp_path / name)
    with open(tmp_path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ValueError, match="does not match its sidecar"):
        OnnxSampler(tmp_path / "model.onnx")
    (tmp_path / "model.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a scidiff ONNX sidecar"):
        OnnxSampler(tmp_path / "model.onnx")


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_is_used_only_when_the_session_really_runs_on_it(kang_onnx, monkeypatch):
    """Plain onnxruntime here: even when the CUDA provider is claimed and a driver reports a GPU,
    the session falls back to CPU and the sampler notices from the providers in use."""
    _, path = kang_onnx
    if "CUDAExecutionProvider" in ort.get_available_providers() and runtime.cuda_device_count() > 0:
        pytest.skip("a real GPU is present")
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    sampler = OnnxSampler(path, threads=1)
    assert sampler.device_type == "cpu" and sampler.providers == ["CPUExecutionProvider"] and not sampler.io_binding
    with pytest.raises(RuntimeError, match="could not start its CUDA provider"):
        OnnxSampler(path, device="cuda", threads=1)
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="driver reports no GPU"):
        OnnxSampler(path, device="cuda", threads=1)


def test_runtime_and_server_import_no_torch(kang_onnx):
    _, path = kang_onnx
    code = ("import sys\n"
            "from scidiff.export.runtime import OnnxSampler\n"
            "import scidiff.export.server, scidiff.cli\n"
            f"s = OnnxSampler({str(path)!r}, threads=1)\n"
            "a = s.sample(5, {'cell_type': 'B'}, seed=0, steps=3)\n"
            "assert a.shape == (5, 100), a.shape\n"
            "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- the samplers against closed forms ---------------------------------------------------------
def _gaussian_problem(schedule="cosine"):
    """Data N(mu, s^2) per dimension: the exact x0 denoiser and the exact probability-flow map
    from x_T (the ODE keeps ``(x_t - a_t mu) / sqrt(a_t^2 s^2 + sigma_t^2)`` constant)."""
    from scidiff.models import get_scheduler

    ab = get_scheduler(schedule, 1000).alphas_cumprod.numpy()
    mu, s = np.float32(1.5), np.float32(0.5)

    def denoiser(x, t):
        a2 = ab[t]
        return (mu + np.sqrt(a2) * s**2 / (a2 * s**2 + 1 - a2) * (x - np.sqrt(a2) * mu)).astype(np.float32)

    x_T = np.random.default_rng(0).standard_normal((4000, 2)).astype(np.float32)
    a_T = ab[-1]
    exact = mu + s * (x_T - np.sqrt(a_T) * mu) / np.sqrt(a_T * s**2 + 1 - a_T)
    return denoiser, x_T, ab, exact


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_dpm_solver_pp_solves_the_flow_ode_to_second_order(schedule):
    denoiser, x_T, ab, exact = _gaussian_problem(schedule)

    def rms(f, n):
        return float(np.sqrt(np.mean((f(denoiser, x_T, ab, n) - exact) ** 2)))

    # DDIM's error halves with each doubling of the steps (first order); DPM-Solver++(2M)'s
    # falls about fourfold (second order) and is far below DDIM's at the same step count
    assert 0.4 < rms(ddim, 20) / rms(ddim, 10) < 0.6 and 0.4 < rms(ddim, 80) / rms(ddim, 40) < 0.6
    assert rms(dpmpp_2m, 80) < 0.1 * rms(dpmpp_2m, 20)
    assert rms(dpmpp_2m, 10) < 0.25 * rms(ddim, 10) and rms(dpmpp_2m, 80) < 0.15 * rms(ddim, 80)


def test_numpy_samplers_walk_the_torch_samplers_grids():
    from scidiff.models import get_scheduler
    from scidiff.diffusion import plans as torch_samplers

    for t_count in (10, 200, 1000):
        ab = get_scheduler("cosine", t_count).alphas_cumprod
        for steps in (1, 2, 3, 7, 50, 999, 1000, None):
            assert runtime.timesteps(t_count, steps) == timesteps(t_count, steps)
            assert runtime.logsnr_timesteps(ab.numpy(), steps) == torch_samplers.logsnr_timesteps(ab.tolist(), steps)


def test_numpy_dpm_solver_pp_equals_torch_dpm_solver_pp():
    from scidiff.diffusion.samplers import dpmpp_2m as torch_dpmpp_2m

    denoiser, x_T, ab, _ = _gaussian_problem("cosine")

    def torch_denoiser(x, t, cond):
        return torch.from_numpy(denoiser(x.numpy(), int(t[0])))

    for steps in (2, 3, 10, 25):
        expected = torch_dpmpp_2m(torch_denoiser, torch.from_numpy(x_T), torch.from_numpy(ab), steps).numpy()
        np.testing.assert_allclose(dpmpp_2m(denoiser, x_T, ab, steps), expected, atol=1e-5)


def test_numpy_ddim_equals_torch_ddim_on_a_closed_form_denoiser():
    denoiser, x_T, ab, _ = _gaussian_problem("linear")
    noise = [np.random.default_rng(i).standard_normal(x_T.shape).astype(np.float32) for i in range(10)]

    def torch_denoiser(x, t, cond):
        return torch.from_numpy(denoiser(x.numpy(), int(t[0])))

    for eta in (0.0, 0.5):
        got = ddim(denoiser, x_T, ab, 10, eta=eta, noise=lambda i: noise[i])
        expected = torch_ddim(torch_denoiser, torch.from_numpy(x_T), torch.from_numpy(ab), 10, eta=eta,
                              noise=[torch.from_numpy(n) for n in noise]).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)


# -- every covariate kind, gene space, the Python API ------------------------------------------
@pytest.mark.parametrize("knots", [None, [0.0, 1.0, 4.0]], ids=["mlp-of-time", "time-knots"])
def test_gene_space_model_with_numeric_and_perturbation_covariates(tmp_path, knots):
    """Time embedded by the network of a checkpoint saved before the knots, and piecewise linearly
    between knots (time 2.0 lies between two)."""
    torch.manual_seed(0)
    genes = [f"gene{i}" for i in range(30)]
    spec = dict(gene_names=genes, categorical={"cell_type": ["T", "B"], "drug": ["a", "b", "c"]},
                continuous=["time"], continuous_knots={"time": knots} if knots else {})
    if "perturbation_keys" in DataSpec.__dataclass_fields__:
        spec.update(perturbation_keys=["drug"], continuous=["time", "dose"], dose_key="dose")
    model = ScIDiffModel(gene_dim=30, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=None,
                         data_spec=DataSpec(**spec)).eval()
    for p in model.parameters():  # non-trivial weights everywhere (zero-initialised layers too)
        p.data.normal_(0, 0.2)
    out = tmp_path / "gene_space.onnx"
    # random weights give outputs up to ~20 here: 1e-3 is ~5e-5 relative
    assert export_onnx(model, out, steps=4)["max_abs_error"] < 1e-3
    assert not os.path.exists(decoder_path(out))
    meta = json.loads(open(sidecar_path(out)).read())
    assert meta["sampling"]["sampler"] == "dpmpp_2m"  # the library's default sampler
    kinds = {c["key"]: c["kind"] for c in meta["covariates"]}
    sampler = OnnxSampler(out, threads=1)
    cond = {"cell_type": "B", "time": 2.0}
    if kinds.get("drug") == "perturbation":
        assert kinds["dose"] == "continuous"
        cond.update(drug="a+c", dose=10.0)
        torch_cond = {"drug": torch.tensor([[1.0, 0.0, 1.0, 0.0]]), "dose": torch.tensor([10.0])}
    else:
        cond.update(drug="c")
        torch_cond = {"drug": torch.tensor([2])}
    x_T = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    got = sampler.sample(8, cond, x_T=x_T.numpy(), sampler="ddim", steps=4, guidance=2.0, output="latent")
    torch_cond.update(cell_type=torch.tensor([1]), time=torch.tensor([2.0]))
    expected = model.sample(8, torch_cond, sampler="ddim", steps=4, guidance_scale=2.0, return_expression=False,
                            generator=torch.Generator().manual_seed(2)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    # the null condition of every kind is the model's own "absent" condition
    wrapper = ConditionTableDenoiser(model)
    probe = example_inputs(model, 6, 2, 1.0)
    with torch.no_grad():
        # fp32: outputs reach ~9 here, where 1e-5 is a few units in the last place
        np.testing.assert_allclose(wrapper(*probe).numpy(), torch_reference(model, probe).numpy(), atol=1e-5,
                                   rtol=2e-6)


def test_a_model_without_covariates_exports_and_samples(tmp_path):
    """``scidiff train`` without --condition-keys gives a model with no covariates: its export
    has no cond_* inputs (tracing once failed naming a ``covariates`` argument it did not have)
    and the runtime samples it like the torch model."""
    torch.manual_seed(0)
    genes = [f"gene{i}" for i in range(12)]
    model = ScIDiffModel(gene_dim=12, hidden_dim=16, num_layers=1, num_timesteps=50, latent_dim=None,
                         data_spec=DataSpec(gene_names=genes, input_kind="counts", target_sum=1000.0)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    out = tmp_path / "plain.onnx"
    assert export_onnx(model, out, sampler="ddim", steps=3)["max_abs_error"] < 1e-3  # random weights: outputs ~10
    meta = json.loads(open(sidecar_path(out)).read())
    assert meta["covariates"] == []
    sampler = OnnxSampler(out, threads=1)
    x_T = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
    got = sampler.sample(6, x_T=x_T.numpy(), steps=3, output="latent")
    expected = model.sample(6, None, sampler="ddim", steps=3, return_expression=False,
                            generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    with pytest.raises(KeyError, match="knows no covariates"):
        sampler.sample(2, {"cell_type": "B"}, seed=0)
    # the library size the cells are normalised to, said as scidiff sample says it (scidiff evaluate reads it)
    arrays = sampler.sample(2, seed=0, steps=3, output="arrays")
    assert arrays["expression"] == expression_note(model, False) and arrays["target_sum"] == 1000.0
    assert sampler.sample(2, seed=0, steps=3).uns["scidiff"]["target_sum"] == 1000.0  # as scidiff sample writes


def test_cli_errors_and_python_api_errors(tmp_path, capsys):
    assert main(["export-onnx", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    model = ScIDiffModel(gene_dim=5, hidden_dim=8, num_layers=1, num_timesteps=10)
    with pytest.raises(ValueError, match="carries no DataSpec"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="must end with .onnx"):
        export_onnx(model, tmp_path / "m.bin")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag,value,message", [
    ("--guidance", "inf", "argument --guidance: expected a finite number"),
    ("--guidance", "-1", "argument --guidance: must be >= 0"),
    ("--eta", "nan", "argument --eta: expected a finite number"),
    ("--eta", "5", "eta must be a finite number in [0, 1]"),
])
def test_export_refuses_defaults_the_runtime_cannot_use(tmp_path, capsys, flag, value, message):
    """The sampling defaults go into the sidecar for every client: a non-finite or out-of-range
    eta or guidance would be written as ``Infinity`` (not JSON), make ``GET /model`` fail and get
    every request that leaves it out refused. Refused before anything is traced or written."""
    run = tmp_path / "run"
    model = ScIDiffModel(gene_dim=5, hidden_dim=8, num_layers=1, num_timesteps=10,
                         data_spec=DataSpec(gene_names=[f"g{i}" for i in range(5)]))
    save_model(model, run)
    out = tmp_path / "export" / "model.onnx"
    try:
        status = main(["export-onnx", "--model", str(run), "--out", str(out), flag, value])
    except SystemExit as exc:  # argparse's refusal of the flag
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())
    kwargs = {"eta": float(value)} if flag == "--eta" else {"guidance_scale": float(value)}
    with pytest.raises(ValueError, match="must be a finite number"):
        export_onnx(model, out, **kwargs)


def test_export_refuses_a_folder_as_the_output_before_any_work(tmp_path, capsys):
    """``--out x.onnx`` where x.onnx is a folder: one clear error before the model is even loaded,
    no decoder file left beside it (it once traced, wrote x.decoder.npz, then failed to rename)."""
    folder = tmp_path / "x.onnx"
    folder.mkdir()
    assert main(["export-onnx", "--model", str(tmp_path / "nothing"), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and str(folder) in err and "no checkpoint" not in err
    model = ScIDiffModel(gene_dim=5, hidden_dim=8, num_layers=1, num_timesteps=10,
                         data_spec=DataSpec(gene_names=[f"g{i}" for i in range(5)]))
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"] and not any(folder.iterdir())


def test_a_missing_covariate_is_drawn_like_the_training_data(kang_onnx):
    """As ``scidiff sample``: the covariates a request leaves out are drawn over the training
    groups that carry it, in their proportions, each cell labelled; an export without groups
    (older) leaves them to the null condition."""
    model, path = kang_onnx
    sampler = OnnxSampler(path, threads=1)
    shares = model.data_spec.training_mixture(60, seed=3)
    labels = {k: [c[k] for c, m in shares for _ in range(m)] for k in ("cell_type", "condition")}
    got = sampler.sample(60, seed=3, steps=3, output="arrays")
    assert {k: got["obs"][k] for k in labels} == labels and len(shares) == 14
    np.testing.assert_array_equal(got["X"], sampler.sample(60, labels, seed=3, steps=3, output="arrays")["X"])
    partial = sampler.sample(40, {"condition": "stimulated"}, seed=1, steps=3, output="arrays")
    assert set(partial["obs"]["condition"]) == {"stimulated"} and len(set(partial["obs"]["cell_type"])) == 7
    # the groups a condition keeps are read once: a second request encodes only what it asks
    calls, encode = [], sampler.encode_value
    sampler.encode_value = lambda k, v: calls.append((k, v)) or encode(k, v)
    again = sampler.like_training({"condition": "stimulated"}, 40, seed=1)
    assert calls == [("condition", "stimulated")]
    assert again["cell_type"] == list(partial["obs"]["cell_type"])
    older = OnnxSampler(path, threads=1)
    older.meta["training_groups"] = {}
    assert list(older.sample(4, seed=3, steps=3, output="arrays")["obs"]) == []


def test_an_export_ends_where_the_model_does(kang_onnx, tmp_path):
    """``final_sigma`` travels in the sidecar and the runtime walks the same plan as the torch
    model; a sidecar written before it existed reads as 0 (clean data)."""
    import copy

    model, _ = kang_onnx
    model = copy.deepcopy(model)
    model.final_sigma.fill_(0.25)
    path = str(tmp_path / "model.onnx")
    export_onnx(model, path)
    sampler = OnnxSampler(path, threads=1)
    assert sampler.final_sigma == pytest.approx(0.25)
    condition = {"cell_type": "B", "condition": "stimulated"}
    x_T = torch.randn(30, 16, generator=torch.Generator().manual_seed(7))
    for name in ("ddim", "dpmpp_2m"):
        expected = model.sample(30, condition, sampler=name, steps=6, observed=False,
                                generator=torch.Generator().manual_seed(7)).numpy()
        got = sampler.sample(30, condition, x_T=x_T.numpy(), steps=6, sampler=name, observed=False, output="arrays")
        np.testing.assert_allclose(got["X"], expected, atol=2e-4, rtol=0)
    meta = json.loads(open(sidecar_path(path)).read())
    del meta["sampling"]["final_sigma"]
    with open(sidecar_path(path), "w") as fh:
        json.dump(meta, fh)
    assert OnnxSampler(path, threads=1, verify=False).final_sigma == 0.0



def test_an_interrupted_re_export_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    """The graph, the decoder and the sidecar are renamed into place together at the end: a
    re-export interrupted while it writes the sidecar (the last file) leaves the earlier export's
    files as they were (the new graph stood beside the old sidecar, whose checksum it failed) and no
    temporary file."""
    import hashlib

    import scidiff.export.onnx as onnx_export

    torch.manual_seed(0)
    genes = [f"gene{i}" for i in range(12)]
    model = ScIDiffModel(gene_dim=12, hidden_dim=16, num_layers=1, num_timesteps=50, latent_dim=None,
                         data_spec=DataSpec(gene_names=genes, input_kind="counts", target_sum=1000.0)).eval()
    out = tmp_path / "m.onnx"
    export_onnx(model, out, sampler="ddim", steps=3, check=False)

    def files():
        return {p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in sorted(os.listdir(tmp_path))}

    before = files()
    assert sorted(before) == ["m.json", "m.onnx"]
    for p in model.parameters():  # other weights: another graph
        p.data.normal_(0, 0.2)

    def interrupted(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, out, sampler="ddim", steps=3, check=False)
    assert files() == before
    monkeypatch.undo()
    OnnxSampler(out, threads=1).sample(2, seed=0, steps=3)  # the earlier export still loads: checksums agree
