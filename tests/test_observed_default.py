"""Realistic by default: generation returns measured cells where the model can measure them (a
principal-axes model with a fitted detection model), smooth cells on request, and every output
says which: model.sample, the engine, scidiff.generate and `scidiff sample`. (The ONNX runtime
and the server: tests/test_export.py, tests/test_serve.py.)"""
import copy

import anndata as ad
import numpy as np
import pytest
import torch

import scidiff
from scidiff.cli import main
from scidiff.engine import SamplingEngine
from scidiff.models import ScIDiffModel

MEASURED = "log1p-normalised, measured through the detection model"  # Kang: log-normalised input
SMOOTH = "log1p-normalised, smooth"


@pytest.fixture(scope="module")
def fitted(kang_small):
    """A small principal-axes model as from_data makes it (detection model fitted) and the share
    of exact zeros in its training cells."""
    data = scidiff.setup_anndata(kang_small, n_top_genes=200, condition_keys=["cell_type"])
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, latent_dim=16, hidden_dim=32, num_layers=1, num_timesteps=100)
    return model, float((data.log_expression() == 0).mean())


def randomised(model):
    """A copy with every weight of the network random (the zero init hides most of it)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.score.parameters():
            p.normal_(0, 0.1)
    return model


def zeros(x) -> float:
    return float((np.asarray(x) == 0).mean())


def test_model_sample_measures_by_default(fitted):
    model, real_zeros = fitted
    assert model.resolve_observed() and model.resolve_observed(True)
    assert not model.resolve_observed(False) and not model.resolve_observed(return_expression=False)
    default = model.sample(300, steps=5, seed=0)
    torch.testing.assert_close(default, model.sample(300, steps=5, seed=0, observed=True), rtol=0, atol=0)
    smooth = model.sample(300, steps=5, seed=0, observed=False)
    assert abs(zeros(default) - real_zeros) < 0.05 and zeros(default) > zeros(smooth) + 0.3


def test_smooth_on_request_is_the_smooth_path_bit_for_bit(fitted):
    """``observed=False`` is the smooth expression of the same cells, as before measured cells
    became the default: the model-space sample through ``to_expression``, and what a model
    without a fitted detection model returns by default."""
    model = randomised(fitted[0])
    cond = {"cell_type": "NK"}
    smooth = model.sample(50, cond, steps=4, seed=3, observed=False)
    raw = model.sample(50, cond, steps=4, seed=3, return_expression=False)  # model space: never measured
    torch.testing.assert_close(smooth, model.data_spec.to_expression(raw), rtol=0, atol=0)
    unfitted = copy.deepcopy(model)
    unfitted.detection.fitted.fill_(False)
    torch.testing.assert_close(unfitted.sample(50, cond, steps=4, seed=3), smooth, rtol=0, atol=0)


def test_models_that_cannot_measure_give_smooth_cells_and_say_so(fitted, kang_small):
    model, _ = fitted
    unfitted = copy.deepcopy(model)
    unfitted.detection.fitted.fill_(False)
    data = scidiff.setup_anndata(kang_small, n_top_genes=30)
    gene_space = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=50)
    for m in (unfitted, gene_space):
        assert not m.resolve_observed()
        cond = {"cell_type": "NK"} if m.data_spec.categorical else {}  # one group, drawn as model.sample draws it
        out = scidiff.generate(m, 10, cond, steps=3, seed=1, progress=False)
        assert out.uns["scidiff"]["observed"] is False and out.uns["scidiff"]["expression"] == SMOOTH
        np.testing.assert_array_equal(out.X, m.sample(10, cond, steps=3, seed=1, observed=False).numpy())


def test_generate_records_what_it_returned(fitted):
    model, _ = fitted
    cond = {"cell_type": "B"}
    measured = scidiff.generate(model, 50, cond, steps=3, seed=2, progress=False)
    assert measured.uns["scidiff"]["observed"] is True and measured.uns["scidiff"]["expression"] == MEASURED
    np.testing.assert_array_equal(measured.X, model.sample(50, cond, steps=3, seed=2).numpy())
    smooth = scidiff.generate(model, 50, cond, steps=3, seed=2, progress=False, observed=False)
    assert smooth.uns["scidiff"]["observed"] is False and smooth.uns["scidiff"]["expression"] == SMOOTH
    np.testing.assert_array_equal(smooth.X, model.sample(50, cond, steps=3, seed=2, observed=False).numpy())


def test_engine_default_equals_model_sample_default(fitted):
    """The fp32 engine draws as model.sample does, the measurement included (right after the
    sampling, from the same generator)."""
    model = randomised(fitted[0])
    engine = SamplingEngine(model, "ddim", 6, dtype=torch.float32)
    cond = {"cell_type": "NK"}
    default = engine.sample(40, cond, seed=3)
    torch.testing.assert_close(default, model.sample(40, cond, sampler="ddim", steps=6, seed=3))
    smooth = engine.sample(40, cond, seed=3, observed=False)
    torch.testing.assert_close(smooth, model.sample(40, cond, sampler="ddim", steps=6, seed=3, observed=False))
    assert zeros(default) > zeros(smooth) + 0.3


def test_cli_sample_measures_by_default_and_smooth_on_request(fitted, tmp_path, capsys):
    model, real_zeros = fitted
    scidiff.save_model(model, tmp_path / "model.pt")
    base = ["sample", "--model", str(tmp_path / "model.pt"), "-n", "60", "--condition", "cell_type=B", "--steps",
            "4", "--seed", "5"]
    written = {}
    for name, flags in (("default", []), ("observed", ["--observed"]), ("smooth", ["--smooth"])):
        assert main(base + flags + ["--out", str(tmp_path / f"{name}.h5ad")]) == 0
        kind = "smooth cells (--smooth)" if name == "smooth" else "measured cells"
        assert f"wrote 60 cells x 200 genes to {tmp_path / name}.h5ad ({kind})" in capsys.readouterr().out
        written[name] = ad.read_h5ad(tmp_path / f"{name}.h5ad")
    default, smooth = written["default"], written["smooth"]
    assert default.uns["scidiff"]["observed"] and default.uns["scidiff"]["expression"] == MEASURED
    assert not smooth.uns["scidiff"]["observed"] and smooth.uns["scidiff"]["expression"] == SMOOTH
    np.testing.assert_array_equal(written["observed"].X, default.X)
    assert abs(zeros(default.X) - real_zeros) < 0.1 and zeros(default.X) > zeros(smooth.X) + 0.3
    expected = scidiff.generate(model, 60, {"cell_type": "B"}, steps=4, seed=5, progress=False, observed=False)
    np.testing.assert_array_equal(smooth.X, expected.X)
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--observed", "--smooth", "--out", str(tmp_path / "both.h5ad")])
    assert exit_.value.code == 2
    assert "argument --smooth: not allowed with argument --observed" in capsys.readouterr().err
    assert not (tmp_path / "both.h5ad").exists()
