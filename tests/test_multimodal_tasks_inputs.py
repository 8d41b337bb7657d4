"""Multimodal files through every task, and the predicted cells as a scanpy user's AnnData.

A CITE-seq / Perturb-seq file as scanpy's ``read_10x_h5(gex_only=False)`` gives it: symbols as
``var_names`` (an ADT ``CD4`` beside the gene ``CD4``, a guide named ``G2`` as its target gene,
names left duplicated), the IDs in ``var['gene_ids']`` (an ADT's ID is its name), the types in
``var['feature_types']``. Checked here: prediction, screens, denoising (both methods) and design
read the RNA gene wherever a name is looked up, never the ADT or guide of its name; the features
left out are said once per call (not once per target of a screen); the predicted cells, model or
baseline, keep the input's ``var`` columns of the RNA gene, unique ``obs_names``, a column naming
each one's source cell and scanpy's ``uns['log1p']``, as ``generate`` writes it, and go through
``sc.pp`` and ``sc.tl.rank_genes_groups``; evaluation re-wrapping a multimodal file keeps its
``uns['log1p']`` (a log2 file refused as without the ADTs).
"""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scidiff
from scidiff.tasks.denoise import denoise
from scidiff.tasks.perturb import perturb
from scidiff.tasks.screen import predict_screen, predict_screen_to_file
from test_predict_screen import single_thread

N_CELLS, N_GENES = 90, 24
GENES = ["CD4"] + [f"G{i}" for i in range(1, N_GENES)]
IDS = [f"ENSG{i:011d}" for i in range(N_GENES)]
OTHER = {"Antibody Capture": ["CD4", "CD8A", "CD19"], "CRISPR Guide Capture": ["G2", "G3-sg1"]}
LEFT_OUT = "left out 3 'Antibody Capture', 2 'CRISPR Guide Capture' feature(s) of 29"
TARGETS = [{"perturbation": "G2"}, {"perturbation": "G3"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def _left_out(record) -> list[str]:
    return [str(w.message) for w in record if "left out" in str(w.message)]


def _cite(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """The multimodal AnnData (RNA counts, ADTs and guides in the thousands) and its RNA-only twin."""
    rng = np.random.default_rng(seed)
    pert = np.array(["control", "G2", "G3"])[np.arange(N_CELLS) % 3]
    lam = np.tile(rng.gamma(2.0, 2.0, N_GENES), (N_CELLS, 1)) * rng.uniform(0.5, 2.0, (N_CELLS, 1))
    lam[pert == "G2", 2] *= 0.1
    lam[pert == "G3", 3] *= 0.1
    rna = rng.poisson(lam).astype(np.float32)
    n_other = sum(map(len, OTHER.values()))
    other = rng.negative_binomial(3, 0.002, (N_CELLS, n_other)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pert}, index=[f"AAAC{i:04d}-1" for i in range(N_CELLS)])
    names = GENES + [n for ns in OTHER.values() for n in ns]
    var = pd.DataFrame({"gene_ids": IDS + names[N_GENES:],
                        "feature_types": ["Gene Expression"] * N_GENES + [t for t, ns in OTHER.items() for _ in ns],
                        "highly_variable": np.arange(len(names)) % 2 == 0}, index=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: "Variable names are not unique" (as read_10x_h5 leaves them)
        both = ad.AnnData(sp.csr_matrix(np.hstack([rna, other])), obs=obs, var=var)
    alone = ad.AnnData(sp.csr_matrix(rna), obs=obs.copy(), var=var.iloc[:N_GENES].copy())
    return both, alone


@pytest.fixture(scope="module")
def trained():
    """A tiny model of the RNA-only twin (the same genes and normalisation as the multimodal file's)."""
    both, alone = _cite()
    torch.manual_seed(0)
    data = scidiff.setup_anndata(alone, n_top_genes=None, perturbation_keys=["perturbation"])
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100)
    scidiff.ScIDiffTrainer(model, data.loader(64), device="cpu", progress=False, early_stopping_patience=None,
                           warmup_steps=2, seed=0).train(2)
    control = both[both.obs["perturbation"] == "control"].copy()
    return model.eval(), both, alone, control


def _rna_var_columns_kept(out: ad.AnnData) -> None:
    """``out`` (cells on the model's genes) carries the RNA genes' own var columns: ``CD4``'s ID is
    the gene's, not the ADT's (``'CD4'``), every feature a gene."""
    assert list(out.var_names) == GENES
    assert list(out.var["gene_ids"]) == IDS
    assert set(out.var["feature_types"]) == {"Gene Expression"}
    assert list(out.var["highly_variable"].astype(bool)) == [i % 2 == 0 for i in range(N_GENES)]


def test_an_adt_and_a_guide_named_like_genes_are_never_read_as_the_gene(trained):
    """Before: every task given the file (prediction, denoising, design from its cells) failed with
    ``TypeError: expected string or bytes-like object, got 'Series'``: the gene ``CD4`` was looked
    up in the full ``var``, where the ADT ``CD4`` shares its name."""
    model, both, alone, control = trained
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pred = perturb(model, control, TARGETS[0], steps=3, progress=False)
    assert len(_left_out(record)) == 1 and LEFT_OUT in _left_out(record)[0]
    _rna_var_columns_kept(pred)
    twin = perturb(model, alone[alone.obs["perturbation"] == "control"].copy(), TARGETS[0], steps=3, progress=False)
    np.testing.assert_array_equal(pred.X, twin.X)  # the ADTs counted in no library size
    np.testing.assert_array_equal(pred.layers["control"], twin.layers["control"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        designed = scidiff.design(model, "CD4>=1", n=4, source=control[:4], steps=3, seed=0, retries=0)
    _rna_var_columns_kept(designed)  # the design target CD4: the gene, its ID the gene's


@pytest.mark.parametrize("method", ["sdedit", "posterior"])
def test_denoising_a_multimodal_file_gives_its_rna_genes_and_says_once_what_it_left_out(trained, method):
    """Before: both methods failed (the ``CD4`` lookup above); the posterior method said the
    features left out twice (its counts read a second time)."""
    model, both, alone, _ = trained
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = denoise(model, both, method=method, steps=3, progress=False)
    assert _left_out(record) == [f"X of the AnnData: {LEFT_OUT}: only the {N_GENES} 'Gene Expression' features are "
                                 "modelled (genes chosen and cells normalised on them)"]
    _rna_var_columns_kept(out)
    twin = denoise(model, alone, method=method, steps=3, progress=False)
    np.testing.assert_array_equal(out.layers["scidiff_denoised"], twin.layers["scidiff_denoised"])


def _scanpy_takes(pred: ad.AnnData) -> None:
    """What a scanpy user does next: PCA (on the input's highly variable flags), highly variable
    genes of their own, marker genes per target, and a concatenation beside other cells."""
    import scanpy as sc

    a = pred.copy()
    sc.pp.pca(a, n_comps=5)
    assert a.obsm["X_pca"].shape == (pred.n_obs, 5) and a.varm["PCs"][1::2].max() == 0  # the flagged genes only
    sc.pp.highly_variable_genes(a, n_top_genes=10)
    sc.tl.rank_genes_groups(a, "scidiff_target", method="t-test")
    assert a.uns["rank_genes_groups"]["names"].shape[0] == N_GENES
    both = ad.concat([pred, pred], index_unique="-", label="copy")
    assert both.obs_names.is_unique and both.n_obs == 2 * pred.n_obs


def test_a_screen_of_several_targets_is_an_anndata_scanpy_takes(trained, tmp_path):
    """Before: the screen of several targets lost scanpy's ``uns['log1p']`` (one target's prediction
    and ``generate``'s cells carry it), no column named each row's source cell (only the name
    ``<cell>-<i>``, ambiguous where cell names end in ``-1``), and the features left out of the
    control cells were warned about once per target (a thousand lines for a thousand targets)."""
    model, _, _, control = trained
    n = control.n_obs
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        screen = predict_screen(model, control, TARGETS, steps=3, progress=False)
    assert len(_left_out(record)) == 1
    assert screen.obs_names.is_unique and screen.obs_names[n] == f"{control.obs_names[0]}-1"
    assert list(screen.obs["scidiff_source_cell"]) == list(control.obs_names) * 2
    assert dict(screen.uns["log1p"]) == {"base": None}
    _rna_var_columns_kept(screen)
    _scanpy_takes(screen)
    path = tmp_path / "screen.h5ad"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        predict_screen_to_file(model, control, TARGETS, path, steps=3, progress=False)
    assert len(_left_out(record)) == 1
    written = ad.read_h5ad(path)
    assert list(written.obs_names) == list(screen.obs_names)
    assert list(written.obs["scidiff_source_cell"]) == list(control.obs_names) * 2
    assert "log1p" in written.uns and list(written.var["gene_ids"]) == IDS
    one = perturb(model, control, TARGETS[0], steps=3, progress=False)
    assert list(one.obs_names) == list(control.obs_names) == list(one.obs["scidiff_source_cell"])
    generated = scidiff.generate(model, n=10, steps=3, progress=False)
    assert dict(generated.uns["log1p"]) == dict(screen.uns["log1p"])


def test_cells_sharing_a_name_give_predictions_with_unique_names(trained):
    """Two samples concatenated without ``index_unique`` (the same barcodes in both): the predicted
    cells shared those names too (anndata warned, scanpy's concatenation failed). Now their names
    are made unique as anndata makes them, said once, the source name kept in a column."""
    model, _, _, control = trained
    shared = control.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: "Observation names are not unique"
        shared.obs_names = [f"c{i % 10}" for i in range(shared.n_obs)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        screen = predict_screen(model, shared, TARGETS, steps=3, progress=False)
    said = [str(w.message) for w in record if "shared by several cells" in str(w.message)]
    assert said == ["10 obs_names of the AnnData are shared by several cells (e.g. 'c0'): the "
                    "predicted cells' names are made unique as `adata.obs_names_make_unique()` makes them; "
                    "obs['scidiff_source_cell'] keeps each one's input name"]
    assert not [w for w in record if "not unique" in str(w.message)]
    assert screen.obs_names.is_unique and list(screen.obs_names[[0, 10]]) == ["c0-0", "c0-1-0"]
    assert list(screen.obs["scidiff_source_cell"]) == list(shared.obs_names) * 2


def test_baseline_predictions_keep_the_var_columns_and_the_log1p_record(trained, tmp_path):
    """``scidiff predict --method mean-shift``: before, the baselines' cells had an empty ``var``
    (no gene IDs, types or flags, where the model's prediction of the same cells keeps them), no
    ``uns['log1p']`` and no source-cell column."""
    from scidiff.cli import main

    _, both, _, control = trained
    train, data, out = (str(tmp_path / f) for f in ("train.h5ad", "control.h5ad", "ms.h5ad"))
    both.write_h5ad(train)
    control.write_h5ad(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["predict", "--method", "mean-shift", "--train", train, "--data", data, "--perturbation-key",
                     "perturbation", "--target", "perturbation=G2", "--target", "perturbation=G3",
                     "--out", out]) == 0
    pred = ad.read_h5ad(out)
    _rna_var_columns_kept(pred)
    assert "log1p" in pred.uns and pred.obs_names.is_unique
    assert list(pred.obs["scidiff_source_cell"]) == list(control.obs_names) * 2
    _scanpy_takes(pred)


def _log2(x: sp.csr_matrix) -> sp.csr_matrix:
    """``sc.pp.normalize_total`` then ``sc.pp.log1p(base=2)`` over every feature of ``x``."""
    totals = np.asarray(x.sum(1)).ravel()
    return sp.csr_matrix(np.log2(1 + x.toarray() / totals[:, None] * 1e4).astype(np.float32))


def test_evaluation_of_a_multimodal_log2_file_refuses_it_as_without_its_adts(trained, tmp_path):
    """Before: the real file re-wrapped on its RNA lost ``uns['log1p']`` (scanpy's record of base
    2), so a log2 file was read as natural log when it held ADTs, refused without them."""
    from scidiff.tasks.evaluate import evaluate_files

    model, both, alone, _ = trained
    generated = scidiff.generate(model, n=20, steps=3, progress=False)
    for adata in (both, alone):
        real = adata.copy()
        real.X = _log2(both.X)[:, :real.n_vars] if adata is alone else _log2(both.X)
        real.uns["log1p"] = {"base": 2.0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=r"is log-transformed in base 2 \(uns\['log1p'\]\['base'\]"):
                evaluate_files(real, generated, str(tmp_path / "eval"), plots=False)


def test_training_on_a_multimodal_screen_says_once_what_it_left_out(tmp_path):
    """``scidiff.train`` reads the file for the set-up, the perturbation effects and the prior: the
    features left out were said three times, now once."""
    both, _ = _cite()
    config = {"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 20},
              "training": {"num_epochs": 1, "batch_size": 64, "warmup_steps": 1, "val_fraction": 0.0},
              "data": {"perturbation_keys": ["perturbation"]}}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scidiff.train(both, str(tmp_path / "run"), config, condition_keys=["perturbation"], progress=False)
    said = _left_out(record)
    assert len(said) == 1 and LEFT_OUT in said[0], said
