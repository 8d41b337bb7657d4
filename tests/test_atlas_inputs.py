"""Bugs a user of large atlases met (the streamed .h5ad path, stream_like, scidiff distil), each
reproduced first: a test here failed before its fix."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scidiff.cli import main
from scidiff.data import setup_anndata, transform_like
from scidiff.data.stream_setup import setup_streaming, stream_like
from scidiff.data.streaming import extension_available
from scidiff.models import ScIDiffModel
from scidiff.training import load_model, save_model

BACKENDS = ["native", "python"] if extension_available() else ["python"]
N_CELLS, N_GENES = 150, 30


def counts_adata(seed: int = 0) -> ad.AnnData:
    """Counts of two cell types (gene-dependent rates, about 35% zeros), no empty cell."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(1.0, 3.0, N_GENES)
    counts = rng.poisson(rate[None, :] * rng.uniform(0.5, 2.0, (N_CELLS, 1))) * (rng.random((N_CELLS, N_GENES)) < 0.65)
    counts[:, 0] += 1
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["B", "T"], N_CELLS))},
                       index=[f"c{i}" for i in range(N_CELLS)])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


def log1p_of(counts, total: float):
    """log1p of counts normalised to ``total`` per cell (scanpy's normalize_total + log1p)."""
    dense = np.asarray(counts.todense(), np.float64)
    return sp.csr_matrix(np.log1p(dense / dense.sum(1, keepdims=True) * total).astype(np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``counts.h5ad`` (counts in X) and ``log.h5ad`` (X: log1p at 500 per cell, not the models'
    10,000; ``layers['counts']`` the counts), the same cells."""
    folder = tmp_path_factory.mktemp("atlas")
    a = counts_adata()
    a.write_h5ad(folder / "counts.h5ad")
    b = ad.AnnData(log1p_of(a.X, 500.0), obs=a.obs.copy(), var=a.var.copy())
    b.layers["counts"] = a.X.copy()
    b.write_h5ad(folder / "log.h5ad")
    return folder


def caught(call):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in seen]


# -- stream_like: values of another scale, as transform_like brings them --------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_like_rescales_log1p_values_of_another_total_as_transform_like_does(files, backend):
    spec = setup_anndata(str(files / "counts.h5ad"), n_top_genes=None, condition_keys=["cell_type"]).spec
    path = str(files / "log.h5ad")
    mem, said_mem = caught(lambda: transform_like(spec, path, layer=None, use_raw=False))
    cells, said = caught(lambda: stream_like(spec, path, layer=None, use_raw=False, backend=backend))
    assert any("look normalised to about" in m for m in said_mem)
    assert any("look normalised to about" in m and path in m for m in said), said
    assert cells.transform.rescale == pytest.approx(20.0, rel=0.05)  # 10,000 / 500
    streamed = cells.read_x(np.arange(N_CELLS))
    assert torch.allclose(streamed, mem.x, atol=1e-5)
    batch = next(iter(cells.loader(64, shuffle=False, prefetch=0)))  # the loader's path (fused where it can be)
    assert torch.allclose(batch["x"], mem.x[:64], atol=1e-5)
    exact = setup_anndata(str(files / "counts.h5ad"), n_top_genes=None, condition_keys=["cell_type"]).x
    assert (streamed - exact).abs().max() < 1e-3  # the counts' own values, up to float rounding


def test_stream_like_normalises_counts_for_a_log1p_model_to_its_scale(files):
    spec = setup_anndata(str(files / "log.h5ad"), n_top_genes=None, condition_keys=["cell_type"]).spec
    path = str(files / "counts.h5ad")
    mem, _ = caught(lambda: transform_like(spec, path))
    cells, said = caught(lambda: stream_like(spec, path))
    assert any("are normalised to 500 per cell" in m for m in said), said
    assert cells.transform.target_sum == pytest.approx(500.0, rel=1e-6) and cells.transform.rescale is None
    assert torch.allclose(cells.read_x(np.arange(N_CELLS)), mem.x, atol=1e-5)


def test_stream_like_leaves_values_of_the_models_scale_alone(files):
    spec = setup_anndata(str(files / "counts.h5ad"), n_top_genes=None, condition_keys=["cell_type"]).spec
    cells, said = caught(lambda: stream_like(spec, str(files / "log.h5ad"), layer="counts"))
    assert cells.transform.rescale is None and not [m for m in said if "normalised" in m]


def test_stream_like_tells_unlabelled_cells_to_take_a_label_the_model_knows(files, tmp_path):
    spec = setup_anndata(str(files / "counts.h5ad"), n_top_genes=None, condition_keys=["cell_type"]).spec
    a = counts_adata()
    col = a.obs["cell_type"].astype(object)
    col.iloc[[4, 9]] = np.nan
    a.obs["cell_type"] = col.astype("category")
    a.write_h5ad(tmp_path / "unlabelled.h5ad")
    with pytest.raises(ValueError, match="give them one of the labels the model knows") as err:
        stream_like(spec, str(tmp_path / "unlabelled.h5ad"))
    assert "c4" in str(err.value) and "fillna('B')" in str(err.value)  # named by obs name; a label it knows


# -- scidiff distil -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_run(files):
    """An untrained tiny model of the counts in ``layers['counts']`` of ``log.h5ad``."""
    data = setup_anndata(str(files / "log.h5ad"), layer="counts", n_top_genes=None, condition_keys=["cell_type"])
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=100,
                                   conditioning_dim=8)
    return save_model(model, files / "run")


def distil_args(run, data, *more):
    return ["distil", "--model", str(run), "--data", str(data), "--steps", "2", "--start-steps", "4",
            "--iterations", "2", "--batch-size", "32", "--device", "cpu", *more]


def test_distil_reads_the_cells_where_the_model_was_trained_on_them(files, layer_run, tmp_path):
    """No --layer: the layer the model's training cells came from (as predict and transform_like
    read it), not X (log1p of another total, rescaled with a warning)."""
    code, said = caught(lambda: main(distil_args(layer_run, files / "log.h5ad", "--out", str(tmp_path / "m.pt"))))
    assert code == 0 and not [m for m in said if "normalised" in m], said
    assert load_model(tmp_path / "m.pt").student.steps == 2


def test_denoise_reads_the_cells_where_the_model_was_trained_on_them(files, layer_run, tmp_path):
    """``scidiff denoise`` without --layer read X (log1p of another total, rescaled with a
    warning) where the model was trained on ``layers['counts']``: the Python API read the layer."""
    out = tmp_path / "d.h5ad"
    code, said = caught(lambda: main(["denoise", "--model", str(layer_run), "--data", str(files / "log.h5ad"),
                                      "--out", str(out)]))
    assert code == 0 and not [m for m in said if "normalised" in m], said
    assert ad.read_h5ad(out).n_obs == N_CELLS


def test_distil_streams_the_cells_from_the_file(files, layer_run, tmp_path):
    code, said = caught(lambda: main(distil_args(layer_run, files / "log.h5ad", "--streaming", "--out",
                                                 str(tmp_path / "s.pt"))))
    assert code == 0 and not [m for m in said if "normalised" in m], said
    student = load_model(tmp_path / "s.pt").student
    assert student.steps == 2 and [r["steps"] for r in student.rounds] == [2]


def test_distil_from_a_student_names_its_steps_when_they_do_not_halve_to_steps(files, layer_run, tmp_path, capsys):
    two = tmp_path / "two.pt"
    assert main(distil_args(layer_run, files / "log.h5ad", "--out", str(two))) == 0
    capsys.readouterr()
    assert main(["distil", "--model", str(two), "--data", str(files / "log.h5ad"), "--steps", "2",
                 "--from-student", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--from-student" in err and "samples in 2 steps" in err and "(1)" in err and "start_steps" not in err


# -- the streamed split -----------------------------------------------------------------------------
def test_a_file_of_one_block_keeps_its_cells_for_training(files):
    """50 cells are one block of 64: validation may not take them all (training had no batch)."""
    cells = setup_streaming(str(files / "counts.h5ad"), n_top_genes=None, condition_keys=["cell_type"], block_size=64)
    small = cells.subset(np.arange(50))
    train, val = small.split(0.6)
    assert len(train) == 50 and len(val) == 0
    train, val = cells.split(0.6)  # three blocks: at least one stays for training
    assert len(train) > 0 and len(val) > 0 and len(train) + len(val) == N_CELLS
