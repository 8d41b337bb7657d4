"""A biologist in Jupyter, never on the command line: cells loaded and subset with scanpy (counts in
``layers['counts']``, log1p values in ``X``, ``.raw`` over more genes), passed to the Python verbs
as the in-memory objects scanpy users hold (views, backed files, ``X`` as float16 or as a scipy
sparse array, integer or boolean labels), the results concatenated with the input and saved with
``write_h5ad``. Each test here failed before its fix."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scidiff
from scidiff.cli.predict import _inside
from scidiff.config import load_config
from scidiff.tasks.cells import h5_mapping
from test_predict_screen import single_thread

RAW_GENES, GENES = 50, 36


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def scanpy_cells(n: int = 240, seed: int = 0) -> ad.AnnData:
    """Poisson counts of three cell types, control and stimulated, laid out as scanpy leaves them:
    counts in ``layers['counts']``, ``normalize_total`` + ``log1p`` in ``X``, ``.raw`` over all
    genes, ``X`` subset to the first ``GENES`` (the highly variable ones)."""
    rng = np.random.default_rng(seed)
    profiles = rng.dirichlet(np.ones(RAW_GENES) * 0.5, size=3)
    kind, stim = rng.integers(0, 3, n), rng.integers(0, 2, n)
    rates = profiles[kind] * rng.integers(600, 1200, n)[:, None]
    rates[:, :5] *= np.where(stim[:, None] == 1, 3.0, 1.0)
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.array(["B", "CD4/CD8 T", "NK"])[kind]),
                        "condition": pd.Categorical(np.array(["control", "stim"])[stim])},
                       index=[f"cell{i}" for i in range(n)])
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(RAW_GENES)]},
                       index=[f"GENE{i}" for i in range(RAW_GENES)])
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.raw = adata
    return adata[:, :GENES].copy()


def train(adata, out, keys, **data):
    config = load_config(overrides={"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 50,
                                              "conditioning_dim": 16, "latent_dim": 8},
                                    "training": {"num_epochs": 2, "batch_size": 64, "warmup_steps": 2},
                                    "data": data})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scidiff.train(adata, str(out), config, condition_keys=list(keys), progress=False)


@pytest.fixture(scope="module")
def cells():
    return scanpy_cells()


@pytest.fixture(scope="module")
def labelled(cells, tmp_path_factory):
    """The cells with an integer cluster column and a boolean one, and a model trained on both."""
    adata = cells.copy()
    adata.obs["cluster"] = pd.Categorical(adata.obs["cell_type"].cat.codes.astype(int))  # 0, 1, 2
    adata.obs["stimulated"] = (adata.obs["condition"] == "stim").to_numpy()
    return adata, train(adata, tmp_path_factory.mktemp("labelled"), ["cluster", "stimulated"])


def test_float16_counts_of_deep_cells_are_read_as_their_float32_counts(labelled):
    """Counts stored as float16 (exact: even numbers up to 4,096 a gene) sum past float16's largest number
    (65,504) in deep cells: the library sum overflowed to inf, so setup_anndata read those cells
    as all zeros (log1p off by up to 8) and the posterior denoiser's library was inf (NaN values)."""
    adata, model = labelled
    rng = np.random.default_rng(1)
    deep = 2 * rng.integers(800, 2048, size=(20, GENES)).astype(np.float32)  # even numbers: exact in float16
    deep[:, -4:] = 0
    assert (deep.astype(np.float16) == deep).all() and (deep.sum(1) > 65504).all()
    obs = adata.obs.iloc[:20].copy()
    as32, as16 = (ad.AnnData(deep.astype(t), obs=obs, var=adata.var.copy()) for t in (np.float32, np.float16))
    read32, read16 = (scidiff.setup_anndata(a, n_top_genes=None, condition_keys=["cluster"]) for a in (as32, as16))
    np.testing.assert_allclose(read16.log_expression(), read32.log_expression(), atol=1e-5)
    den32, den16 = (scidiff.denoise(model, a, method="posterior", steps=4, progress=False) for a in (as32, as16))
    assert np.isfinite(den16.layers["scidiff_denoised"]).all()
    np.testing.assert_allclose(den16.layers["scidiff_denoised"], den32.layers["scidiff_denoised"], atol=1e-5)
    np.testing.assert_allclose(den16.X, den32.X, atol=1e-5)


@pytest.mark.parametrize("array", [sp.csr_array, sp.csc_array])
def test_x_as_a_scipy_sparse_array_is_read_as_the_sparse_matrix(cells, tmp_path, array):
    """anndata holds ``X`` as a scipy sparse array (``csr_array``: ``anndata.settings.
    use_sparse_array_on_read``, or assigned by the user); training failed with AttributeError:
    'csr_array' object has no attribute 'getnnz' (the empty-cell check)."""
    counts = cells.layers["counts"]
    as_matrix = ad.AnnData(counts.copy(), obs=cells.obs.copy(), var=cells.var.copy())
    as_array = ad.AnnData(array(counts), obs=cells.obs.copy(), var=cells.var.copy())
    ref = scidiff.setup_anndata(as_matrix, n_top_genes=20, condition_keys=["cell_type"])
    got = scidiff.setup_anndata(as_array, n_top_genes=20, condition_keys=["cell_type"])
    assert got.spec.gene_names == ref.spec.gene_names
    np.testing.assert_allclose(got.log_expression(), ref.log_expression(), atol=1e-6)
    model = train(as_array, tmp_path / "run", ["cell_type"])
    assert model.data_spec.input_kind == "counts"


def test_a_transferred_prediction_whose_context_label_holds_a_slash_reads_back_as_written(cells, tmp_path):
    """A cell type called ``'CD4/CD8 T'`` never seen stimulated: the prediction's
    ``uns['scidiff_prediction']['transferred_from']`` was keyed by ``'cell_type=CD4/CD8 T'``, which
    write_h5ad stored as a path (anndata's FutureWarning: forward slashes will be disallowed) and
    read back as ``{'cell_type=CD4': {'CD8 T': ...}}``."""
    unseen = ((cells.obs["cell_type"] == "CD4/CD8 T") & (cells.obs["condition"] == "stim")).to_numpy()
    model = train(cells[~unseen], tmp_path / "run", ["cell_type", "condition"], perturbation_keys=["condition"])
    control = cells[(cells.obs["condition"] == "control").to_numpy()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pred = scidiff.perturb(model, control, {"condition": "stim"}, steps=4, observed=False, progress=False)
    record = pred.uns["scidiff_prediction"]
    sources = h5_mapping(record["transferred_from"])
    assert sources == {"cell_type=CD4/CD8 T": ["cell_type=B", "cell_type=NK"]}
    assert set(h5_mapping(record["transferred_inside"])) == {"cell_type=CD4/CD8 T"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no key anndata will refuse
        pred.write_h5ad(tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad").uns["scidiff_prediction"]
    assert {k: list(v) for k, v in h5_mapping(back["transferred_from"]).items()} == sources
    inside = {k: h5_mapping(v) for k, v in h5_mapping(back["transferred_inside"]).items()}
    assert inside == {k: h5_mapping(v) for k, v in h5_mapping(record["transferred_inside"]).items()}
    assert _inside(back) == _inside(record) and _inside(record).startswith("cell_type=B ")


@pytest.mark.parametrize("condition, key, value", [({"stimulated": True}, "stimulated", True),
                                                   ({"cluster": 2}, "cluster", 2)])
def test_a_prediction_keeps_the_type_of_the_column_it_sets(labelled, tmp_path, condition, key, value):
    """A boolean ``stimulated`` column, or a cluster's integer categories, was set to the text
    ``'True'`` / ``'2'``: ``pred.obs[key] == value`` matched no cell, and the prediction
    concatenated with its input (``ad.concat``) held both ``2`` and ``'2'`` in one column, which
    write_h5ad refused (TypeError: Can't implicitly convert non-string objects to strings)."""
    adata, model = labelled
    control = adata[~adata.obs["stimulated"].to_numpy()]
    before = control.obs.copy()
    pred = scidiff.perturb(model, control, condition, steps=4, observed=False, progress=False)
    assert (pred.obs[key] == value).all()
    assert pred.obs[key].dtype == bool if key == "stimulated" else list(pred.obs[key].cat.categories) == [2]
    pd.testing.assert_frame_equal(control.obs, before)  # the input's own column left as it was
    both = ad.concat([control, pred], index_unique="-")
    both.write_h5ad(tmp_path / "both.h5ad")
    back = ad.read_h5ad(tmp_path / "both.h5ad")
    assert (back.obs[key].to_numpy()[control.n_obs:] == value).all()
    assert (back.obs[key].to_numpy()[:control.n_obs] == control.obs[key].to_numpy()).all()


def test_log2_values_of_the_highly_variable_genes_are_refused_by_scanpys_record(labelled):
    """``sc.pp.log1p(adata, base=2)`` and then ``X`` subset to the highly variable genes: no cell's
    total shows the base any more, and the values were read as natural log1p (every value 0.69
    times what it should be). scanpy records the base in ``uns['log1p']``; following the error's
    advice gives the natural-log cells."""
    adata, model = labelled
    natural = adata.raw.to_adata()  # log1p over all genes
    log2 = natural.copy()
    log2.X.data = log2.X.data / np.log(2)  # log2(normalised + 1), as sc.pp.log1p(base=2) writes it
    log2.uns["log1p"] = {"base": 2}
    hvg = log2[:, :GENES]
    with pytest.raises(ValueError, match=r"base 2 \(uns\['log1p'\]\['base'\]"):
        scidiff.setup_anndata(hvg, n_top_genes=None)
    with pytest.raises(ValueError, match=r"log-transformed in base 2"):
        scidiff.denoise(model, hvg, steps=4, progress=False)
    hvg = hvg.copy()
    hvg.X = hvg.X * np.log(2)  # the error's advice
    hvg.uns["log1p"]["base"] = None
    np.testing.assert_allclose(scidiff.setup_anndata(hvg, n_top_genes=None).log_expression(),
                               scidiff.setup_anndata(natural[:, :GENES], n_top_genes=None).log_expression(), atol=1e-5)


def test_cell_data_prints_on_one_line(cells):
    """``print(setup_anndata(...))`` in a notebook printed every tensor and the whole DataSpec
    (hundreds of lines for 240 cells); it now says what AnnData's own repr says, on one line."""
    data = scidiff.data.setup_anndata(cells, condition_keys=["cell_type", "condition"])
    assert repr(data) == (f"CellData of 240 cells x {GENES} genes; covariates: cell_type (3 labels), "
                          "condition (2 labels)")
    assert repr(data.subset([0, 1, 2])).startswith("CellData of 3 cells x ")
