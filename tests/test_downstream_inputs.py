"""A biologist takes scidiff's cells downstream with scanpy and anndata: generated, designed and
predicted cells concatenated with the real ones (``ad.concat([real, generated], label="source")``),
saved with ``write_h5ad``, grouped by the covariates the model was conditioned on (an integer
cluster, a boolean flag); ``scidiff sample``'s file read back as the Python result. Each test here
failed before its fix."""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.cli import main
from scidiff.data import read_h5ad, write_h5ad
from scidiff.tasks import generate as generation
from scidiff.training import load_model
from scidiff.training.checkpoint import payload_digest
from test_notebook_inputs import scanpy_cells, train
from test_predict_screen import single_thread

FAST = {"steps": 3, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Cells with an integer ``cluster`` (categorical) and a boolean ``stimulated`` column, and a
    model trained on both, saved in a run folder."""
    adata = scanpy_cells(160)
    adata.obs["cluster"] = pd.Categorical(adata.obs["cell_type"].cat.codes.astype(int))  # 0, 1, 2
    adata.obs["stimulated"] = (adata.obs["condition"] == "stim").to_numpy()
    run = tmp_path_factory.mktemp("run")
    return adata, train(adata, run, ["cluster", "stimulated"]), run


def _typed(obs: pd.DataFrame) -> None:
    assert obs["stimulated"].dtype == bool
    assert obs["cluster"].cat.categories.dtype.kind == "i"


def test_generated_cells_keep_the_type_of_the_columns_they_were_trained_on(labelled, tmp_path):
    """``generate(model, n, {"cluster": 2})`` labelled its cells ``'2'`` (and ``'True'``):
    ``ad.concat([real, generated]).write_h5ad`` raised TypeError: Can't implicitly convert
    non-string objects to strings, and ``obs['cluster'] == 2`` matched no generated cell."""
    adata, model, _ = labelled
    asked = generation.generate(model, 6, {"cluster": 2, "stimulated": True}, **FAST)
    mixed = generation.generate(model, 20, **FAST)  # the training groups, labelled in full
    for cells in (asked, mixed):
        _typed(cells.obs)
        both = ad.concat([adata, cells], label="source", index_unique="-")
        both.write_h5ad(tmp_path / "both.h5ad")
        back = ad.read_h5ad(tmp_path / "both.h5ad")
        assert back.obs["stimulated"].dtype == bool
        np.testing.assert_array_equal(back.obs["cluster"].to_numpy()[adata.n_obs:], cells.obs["cluster"].to_numpy())
    assert (asked.obs["cluster"] == 2).all() and asked.obs["stimulated"].all()
    assert set(mixed.obs["cluster"]) <= {0, 1, 2}


def test_generated_and_designed_cells_keep_the_training_var_columns(labelled, tmp_path):
    """Generated cells' ``var`` held the gene names alone: the training file's Ensembl IDs
    (``var['gene_ids']``) were gone, though denoised and predicted cells keep them."""
    adata, model, run = labelled
    want = adata.var["gene_ids"].reindex(model.data_spec.gene_names).tolist()
    assert main(["sample", "--model", str(run), "-n", "3", "--steps", "3", "--out", str(tmp_path / "s.h5ad")]) == 0
    for cells in (generation.generate(model, 3, **FAST), ad.read_h5ad(tmp_path / "s.h5ad"),
                  scidiff.design(model, f"{model.data_spec.gene_names[0]}>=0.5", n=2, steps=2, retries=0)):
        assert cells.var["gene_ids"].tolist() == want


def test_cells_scidiff_returns_carry_scanpys_log1p_record(labelled, tmp_path):
    """Generated, predicted and designed cells hold log1p values in ``X`` but no
    ``uns['log1p']`` (nor denoised cells read from counts): ``sc.pp.log1p`` took them a second
    time without scanpy's warning that ``X`` is log-transformed already."""
    adata, model, run = labelled
    counts = ad.AnnData(adata.layers["counts"].copy(), obs=adata.obs.copy(), var=adata.var.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        returned = {"generate": generation.generate(model, 3, **FAST),
                    "denoise": scidiff.denoise(model, counts[:4], steps=3, progress=False),
                    "perturb": scidiff.perturb(model, adata[~adata.obs["stimulated"].to_numpy()][:4],
                                               {"stimulated": True}, steps=3, observed=False, progress=False),
                    "design": scidiff.design(model, f"{model.data_spec.gene_names[0]}>=0.5", n=2, steps=2, retries=0)}
    assert main(["sample", "--model", str(run), "-n", "3", "--steps", "3", "--out", str(tmp_path / "s.h5ad")]) == 0
    returned["sample"] = ad.read_h5ad(tmp_path / "s.h5ad")
    for verb, cells in returned.items():
        assert dict(cells.uns.get("log1p", {"base": "missing"})) in ({"base": None}, {}), verb  # None reads back as {}
        assert 0 < float(np.max(cells.X)) < 20, verb  # log1p, not counts


def test_the_sample_commands_file_reads_back_as_the_python_cells(labelled, tmp_path):
    """``scidiff sample`` (and a sharded generation merged) wrote the covariates as text
    categories: the file was not the Python result, and concatenated with the real cells it
    could not be saved."""
    adata, model, run = labelled
    ref = generation.generate(model, 5, {"cluster": 1, "stimulated": False}, seed=4, **FAST)
    out = tmp_path / "s.h5ad"
    assert main(["sample", "--model", str(run), "-n", "5", "--condition", "cluster=1,stimulated=False",
                 "--steps", "3", "--seed", "4", "--out", str(out)]) == 0
    got = ad.read_h5ad(out)
    pd.testing.assert_frame_equal(got.obs, ref.obs)
    np.testing.assert_allclose(got.X, ref.X, atol=1e-6)
    ad.concat([adata, got], index_unique="-").write_h5ad(tmp_path / "both.h5ad")
    for rank in (1, 0):
        generation.generate_sharded(model, 8, tmp_path / "sharded", [{"cluster": 2}], rank=rank, world_size=2,
                                    merge=rank == 0, **FAST)
    merged = ad.read_h5ad(tmp_path / "sharded" / "generated.h5ad")
    _typed(merged.obs)
    assert (merged.obs["cluster"] == 2).all()


def test_a_model_saved_without_label_types_still_labels_as_text(labelled, tmp_path):
    """A checkpoint saved before the spec recorded its columns' types (and ``var``) loads, and its
    cells keep the text labels they always had."""
    _, model, run = labelled
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    spec = json.loads(payload["data_spec"])
    assert spec["label_types"] == {"cluster": "category:int64", "stimulated": "bool"}
    del spec["label_types"], spec["gene_var"]
    payload["data_spec"] = json.dumps(spec)
    payload["digest"] = payload_digest(payload)
    (tmp_path / "old").mkdir()
    torch.save(payload, tmp_path / "old" / "model.pt")
    old = load_model(tmp_path / "old")
    cells = generation.generate(old, 4, {"cluster": 2, "stimulated": True}, **FAST)
    assert list(cells.obs["cluster"].cat.categories) == ["2"]
    assert list(cells.obs["stimulated"].cat.categories) == ["True"]
    assert list(cells.var.columns) == []


def test_designed_and_predicted_cells_keep_the_training_columns_type(labelled, tmp_path):
    """``DesignResult.to_anndata`` wrote each condition label as ``str(v)``; a prediction from
    cells without the covariate's column labelled it as text."""
    adata, model, _ = labelled
    gene = str(model.data_spec.gene_names[0])
    designed = scidiff.design(model, f"{gene}>=0.5", n=3, condition={"cluster": 2, "stimulated": True}, steps=2,
                              retries=0)
    assert (designed.obs["cluster"] == 2).all() and designed.obs["stimulated"].dtype == bool
    control = adata[~adata.obs["stimulated"].to_numpy()].copy()
    del control.obs["stimulated"]  # no column: control
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pred = scidiff.perturb(model, control, {"stimulated": True}, steps=3, observed=False, progress=False)
    assert pred.obs["stimulated"].dtype == bool and pred.obs["stimulated"].all()
    ad.concat([adata, designed, pred], index_unique="-").write_h5ad(tmp_path / "all.h5ad")


def test_write_h5ad_leaves_the_callers_cells_as_they_were(labelled, tmp_path):
    """``scidiff.data.write_h5ad(adata, path)`` popped ``uns['scidiff_source']`` (the file the
    cells were read from) from the caller's object."""
    adata, _, _ = labelled
    adata.write_h5ad(tmp_path / "in.h5ad")
    cells = read_h5ad(str(tmp_path / "in.h5ad"))
    source = cells.uns["scidiff_source"]
    write_h5ad(cells, tmp_path / "out.h5ad")
    assert cells.uns["scidiff_source"] == source
    assert "scidiff_source" not in ad.read_h5ad(tmp_path / "out.h5ad").uns


def test_a_streamed_set_up_records_the_label_types_as_setup_anndata(labelled, tmp_path):
    """A model set up by streaming its file (no perturbation keys) recorded no types: its
    generated cells were labelled ``'2'`` and ``'True'`` where an in-memory set-up gave ``2``."""
    from scidiff.data.stream_setup import setup_streaming  # lazy: only this test streams

    adata, _, _ = labelled
    counts = ad.AnnData(adata.layers["counts"].copy(), obs=adata.obs.copy(), var=adata.var.copy())
    counts.write_h5ad(tmp_path / "cells.h5ad")
    keys = {"condition_keys": ["cluster", "stimulated", "cell_type"], "n_top_genes": None}
    streamed = setup_streaming(str(tmp_path / "cells.h5ad"), **keys).spec
    assert streamed.label_types == scidiff.setup_anndata(counts, **keys).spec.label_types == {
        "cluster": "category:int64", "stimulated": "bool"}
    assert streamed.labels_as_trained("cluster", ["2", "0"]).tolist() == [2, 0]
