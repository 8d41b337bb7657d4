"""The Python API called from a notebook with the argument types people pass there: numbers as numpy
scalars or whole floats (``steps=5.0``, ``eta=np.float32(0.5)``), bools where a number or a flag is
asked for, a dict where a list of dicts is asked for and text where a dict is, sets (no order),
``~`` paths, obs keys as lists. Each call either gives what the same call with plain Python types
gives (equal arrays, same seed) or is refused with an error naming the argument and the value.
Each test here failed before its fix."""
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.config import load_config
from scidiff.diffusion.plans import sampler_plan
from scidiff.tasks.design import InverseDesigner, PhenotypeTarget, gene_attribution, screen_perturbations
from scidiff.tasks.evaluate import evaluate_files, evaluate_perturbation
from scidiff.tasks.generate import generate_sharded, generate_to_file, read_generated
from scidiff.tasks.screen import predict_screen
from test_notebook_inputs import scanpy_cells
from test_predict_screen import single_thread
from training_helpers import drug_knockout_model

STEPS = r"^steps must be an integer >= 1 or None \(all timesteps\), got True$"
CONDITION = r"condition must be a dict of covariate -> label \(e.g. \{'cell_type': 'B'\}\), got 'B'"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def timed_cells():
    """160 cells of two cell types x control/stim, with a continuous ``time`` (0-3)."""
    adata = scanpy_cells(n=160)
    adata.obs["time"] = np.where(adata.obs["condition"] == "stim", 2.0, 0.0) + np.arange(adata.n_obs) % 2
    return adata


def timed_model(cells, folder):
    """A 2-epoch model of :func:`timed_cells` conditioned on cell type, condition and time."""
    config = load_config(overrides={"model": {"hidden_dim": 32, "num_layers": 1, "num_timesteps": 50,
                                              "conditioning_dim": 16, "latent_dim": 8},
                                    "training": {"num_epochs": 2, "batch_size": 64, "warmup_steps": 2},
                                    "data": {"continuous_keys": ["time"]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scidiff.train(cells, str(folder), config, condition_keys=["cell_type", "condition"], progress=False)


@pytest.fixture(scope="module")
def cells():
    return timed_cells()


@pytest.fixture(scope="module")
def model(cells, tmp_path_factory):
    return timed_model(cells, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def control(cells):
    return cells[cells.obs["condition"] == "control"][:24].copy()


def gen(model, **kw):
    kw = {"condition": {"cell_type": "B", "time": 2.0}, "steps": 5, "seed": 1, "progress": False, **kw}
    return scidiff.generate(model, 12, **kw).X


# -- steps, eta, final_sigma: the sampler's numbers ------------------------------------------------------------
def test_steps_given_as_a_whole_float_are_that_many_and_true_is_refused(model, control):
    """``steps=5.0`` failed deep in range() ("'float' object cannot be interpreted as an integer") in
    generate, model.sample, the engine and perturb; ``steps=True`` ran one step."""
    np.testing.assert_array_equal(gen(model, steps=5.0), gen(model, steps=5))
    np.testing.assert_array_equal(gen(model, steps=np.int64(5)), gen(model, steps=5))
    sample = model.sample(6, {"cell_type": "B"}, steps=5.0, seed=3)
    np.testing.assert_array_equal(sample, model.sample(6, {"cell_type": "B"}, steps=5, seed=3))
    engine = scidiff.SamplingEngine(model, "ddim", 5.0)
    np.testing.assert_array_equal(engine.sample(6, {"cell_type": "B"}, seed=3),
                                  scidiff.SamplingEngine(model, "ddim", 5).sample(6, {"cell_type": "B"}, seed=3))
    assert engine.steps == 5 and type(engine.steps) is int
    target = {"condition": "stim"}
    np.testing.assert_array_equal(scidiff.perturb(model, control, target, steps=5.0, progress=False).X,
                                  scidiff.perturb(model, control, target, steps=5, progress=False).X)
    for call in (lambda: gen(model, steps=True), lambda: model.sample(6, steps=True, seed=3),
                 lambda: scidiff.SamplingEngine(model, "ddim", True),
                 lambda: scidiff.perturb(model, control, target, steps=True, progress=False)):
        with pytest.raises(ValueError, match=STEPS):
            call()


def test_a_numpy_float32_eta_gives_the_cells_of_the_same_float(model):
    """np.float32(0.5) is exactly 0.5, but it made the DDIM coefficients float32 (other cells than
    eta=0.5); True ran as eta=1 and '0.5' failed comparing a str with a float."""
    plan, same = (sampler_plan("ddim", model.scheduler, 5, eta=e) for e in (np.float32(0.5), 0.5))
    assert plan == same and all(type(s.noise_coef) is float for s in plan)
    np.testing.assert_array_equal(gen(model, sampler="ddim", eta=np.float32(0.5)), gen(model, sampler="ddim", eta=0.5))
    for eta in (True, "0.5"):
        with pytest.raises(ValueError, match=rf"eta must lie in \[0, 1\] .*, got {eta!r}"):
            model.sample(4, sampler="ddim", eta=eta, seed=0)
        with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
            scidiff.SamplingEngine(model, "ddim", 5, eta=eta)  # True was float(True) = 1


def test_final_sigma_true_is_refused(model):
    """``final_sigma=True`` ended the walk at noise level 1."""
    with pytest.raises(ValueError, match=r"final_sigma must be a number >= 0 \(None: the model's own\), got True"):
        model.sample(4, seed=0, final_sigma=True)


# -- conditions: a dict, not text; a list of dicts, not one -------------------------------------------------------
def test_a_condition_given_as_text_is_refused_naming_it(model, control):
    """A bare label failed as "dictionary update sequence element #0 has length 1" (generate,
    perturb) or "'str' object has no attribute 'items'" (model.sample, design)."""
    with pytest.raises(ValueError, match=CONDITION):
        scidiff.generate(model, 4, "B", progress=False)
    with pytest.raises(ValueError, match=r"^condition must be a dict of covariate -> label .*, got 'stim'$"):
        scidiff.perturb(model, control, "stim", progress=False)
    with pytest.raises(ValueError, match="^conditioning must be a dict of covariate -> label"):
        model.sample(4, "B", seed=0)
    with pytest.raises(ValueError, match=CONDITION):
        scidiff.design(model, "GENE0>=1", n=4, steps=3, retries=0, condition="B")


def test_a_condition_given_as_a_pandas_series_is_its_dict(model):
    """A Series (a row of a table of conditions) failed as "The truth value of a Series is ambiguous"."""
    row = pd.Series({"cell_type": "B", "time": 2.0})
    np.testing.assert_array_equal(gen(model, condition=row), gen(model))


def test_a_numeric_covariate_given_as_text_or_a_bool_is_refused(model):
    """``{'time': '2'}`` failed as "new(): invalid data type 'str'"; ``True`` was a time of 1."""
    np.testing.assert_array_equal(gen(model, condition={"cell_type": "B", "time": np.float32(2)}), gen(model))
    for value in ("2", True):
        with pytest.raises(ValueError, match=rf"condition 'time' is a numeric covariate: give a number \(or one per "
                                             rf"cell\), got {value!r}"):
            gen(model, condition={"cell_type": "B", "time": value})


def test_one_dict_where_a_list_of_them_is_asked_for_is_refused(model, control, tmp_path):
    """predict_screen read the keys of one target dict as targets ("dictionary update sequence ...");
    generate_to_file read a groups dict's keys as groups."""
    with pytest.raises(ValueError, match=r"^targets must be a list of dicts, e.g. \[\{'condition': 'stimulated'\}\], "
                                         r"got \{'condition': 'stim'\}"):
        predict_screen(model, control, {"condition": "stim"}, progress=False, steps=3)
    with pytest.raises(ValueError, match="^targets must be a list of dicts.*got 'stim'"):
        predict_screen(model, control, "stim", progress=False, steps=3)
    with pytest.raises(ValueError, match=r"^groups must be a list of condition dicts.*got \{'cell_type': 'B'\}"):
        generate_to_file(model, 4, tmp_path / "g.h5ad", groups={"cell_type": "B"}, progress=False)
    assert not (tmp_path / "g.h5ad").exists()


# -- whole numbers and flags -------------------------------------------------------------------------------------
def test_perturb_batch_size_as_a_whole_float_and_refused_as_a_bool_or_zero(model, control):
    """7.0 failed in range(); 0 as "range() arg 3 must not be zero"; True ran batches of one."""
    target = {"condition": "stim"}
    np.testing.assert_array_equal(scidiff.perturb(model, control, target, steps=3, batch_size=7.0, progress=False).X,
                                  scidiff.perturb(model, control, target, steps=3, batch_size=7, progress=False).X)
    for size in (True, 0):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {size!r}"):
            scidiff.perturb(model, control, target, steps=3, batch_size=size, progress=False)


def test_design_counts_are_whole_numbers(model):
    """design's int() read n=True as one cell, n=8.7 as 8 and retries=True as 1; retries=1.0 failed
    in range(); steps=True was blamed on the sampler ("resampling needs a stochastic sampler");
    objective_scale=True pulled with strength 1."""
    def design(**kw):
        return scidiff.design(model, "GENE0>=1", **{"n": 4, "steps": 3, "seed": 1, "retries": 0, **kw}).X

    np.testing.assert_array_equal(design(retries=1.0), design(retries=1))
    np.testing.assert_array_equal(design(n=np.int64(4)), design())
    for name, value in (("n", True), ("n", 8.7), ("n", 4.0), ("steps", True), ("retries", True)):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer, got {value!r}$"):
            design(**{name: value})
    np.testing.assert_array_equal(design(objective_scale=np.float32(2.5)), design(objective_scale=2.5))
    with pytest.raises(ValueError, match=r"^objective_scale must be a finite number \(0: no pull toward the target\), "
                                         r"got True$"):
        design(objective_scale=True)


def test_train_flags_given_as_text_are_refused_before_training(cells, tmp_path):
    """``progress='no'`` showed progress and ``deterministic='no'`` ran deterministic kernels
    (any non-empty text is true)."""
    for name in ("progress", "deterministic", "streaming"):
        with pytest.raises(ValueError, match=f"^{name} must be True or False, got 'no'$"):
            scidiff.train(cells, str(tmp_path / name), **{"progress": False, name: "no"})
        assert not (tmp_path / name).exists()


# -- setup_anndata --------------------------------------------------------------------------------------------
def test_a_set_of_genes_or_keys_is_taken_sorted(cells):
    """A set's order changes between Python processes (string hashing): the same set of genes gave
    the genes, and so the model, in another order in each session."""
    genes = [f"GENE{i}" for i in range(30)]
    by_set = scidiff.setup_anndata(cells, genes=set(genes), condition_keys={"condition", "cell_type"})
    by_list = scidiff.setup_anndata(cells, genes=sorted(genes), condition_keys=["cell_type", "condition"])
    assert by_set.spec.gene_names == sorted(genes)
    assert by_set.spec.to_dict() == by_list.spec.to_dict()
    np.testing.assert_array_equal(by_set.x, by_list.x)


def test_setup_use_raw_and_target_sum_are_refused_unless_a_bool_and_a_positive_number(cells):
    """``use_raw='no'`` read raw.X (non-empty text is true); ``target_sum=True`` normalised each cell
    to 1 count and -1 to NaN."""
    counts = cells.copy()
    counts.X = counts.layers["counts"]
    same = scidiff.setup_anndata(counts, n_top_genes=20, target_sum=np.float32(1e4))
    np.testing.assert_array_equal(same.x, scidiff.setup_anndata(counts, n_top_genes=20, target_sum=1e4).x)
    np.testing.assert_array_equal(scidiff.setup_anndata(cells, n_top_genes=20, use_raw=np.True_).x,
                                  scidiff.setup_anndata(cells, n_top_genes=20, use_raw=True).x)
    with pytest.raises(ValueError, match="^use_raw must be True or False, got 'no'$"):
        scidiff.setup_anndata(cells, n_top_genes=20, use_raw="no")
    for total in (True, -1.0):
        with pytest.raises(ValueError, match=rf"^target_sum must be a positive number of counts per cell \(None: "
                                             rf"the median\), got {total!r}$"):
            scidiff.setup_anndata(counts, n_top_genes=20, target_sum=total)


# -- paths ---------------------------------------------------------------------------------------------------
def test_tilde_paths_are_the_home_folder(model, cells, tmp_path, monkeypatch):
    """``~`` was taken literally: reading '~/cells.h5ad' or loading '~/model.pt' said "no such
    file", and writing made a folder named '~' in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cells.write_h5ad(home / "cells.h5ad")
    np.testing.assert_array_equal(scidiff.setup_anndata("~/cells.h5ad", n_top_genes=20).x,
                                  scidiff.setup_anndata(home / "cells.h5ad", n_top_genes=20).x)
    scidiff.save_model(model, "~/model.pt")
    loaded = scidiff.load_model("~/model.pt")
    np.testing.assert_array_equal(gen(loaded), gen(model))
    generate_to_file(model, 4, "~/generated.h5ad", progress=False, steps=3)
    generate_sharded(model, 4, "~/shards", seed=0, progress=False, steps=3)
    assert read_generated("~/shards").n_obs == 4 and (home / "shards" / "manifest.json").exists()
    evaluate_files(cells, ad.read_h5ad(home / "generated.h5ad"), "~/report", plots=False)
    assert (home / "model.pt").exists() and (home / "report" / "metrics.json").exists()
    assert os.listdir(work) == []


# -- evaluation -------------------------------------------------------------------------------------------------
def test_evaluate_arguments_are_refused_naming_them(model, cells, control, tmp_path):
    """A list as groupby or perturbation_key failed as "unhashable type: 'list'"; plots='no' and
    use_raw='no' were true (use_raw='no' scored raw.X); auc_repeats=True and min_de_genes=True ran
    as 1; cell_eval='no' or np.False_ ran cell-eval."""
    generated = scidiff.generate(model, 30, steps=3, progress=False)
    with pytest.raises(ValueError, match=r"^groupby must be one obs column name \(text\), got \['cell_type'\]$"):
        evaluate_files(cells, generated, tmp_path / "a", groupby=["cell_type"])
    for name, value, rule in (("plots", "no", "True or False"), ("use_raw", "no", "True or False"),
                              ("auc_repeats", True, "an integer >= 1")):
        with pytest.raises(ValueError, match=f"^{name} must be {rule}, got {value!r}$"):
            evaluate_files(cells, generated, tmp_path / "a", **{name: value})
    report = evaluate_files(cells, generated, tmp_path / "b", plots=np.False_, use_raw=np.False_, auc_repeats=2.0)
    assert report["auc_repeats"] == 2 and "plots" not in report
    predicted = scidiff.perturb(model, control, {"condition": "stim"}, steps=3, progress=False)
    with pytest.raises(ValueError, match=r"^perturbation_key must be one obs column name \(text\), "
                                         r"got \['condition'\]$"):
        evaluate_perturbation(cells, predicted, ["condition"], cell_eval=False)
    for name, value, rule in (("cell_eval", "no", "True, False or 'auto'"), ("min_de_genes", True, "an integer >= 0"),
                              ("use_raw", "no", "True or False")):
        with pytest.raises(ValueError, match=f"^{name} must be {rule}, got {value!r}$"):
            evaluate_perturbation(cells, predicted, "condition", **{"cell_eval": False, name: value})
    result = evaluate_perturbation(cells, predicted, "condition", cell_eval=np.False_)
    assert result["cell_eval"] == {"installed": None, "note": "not run (cell_eval=False)"}


# -- the in-silico screen ---------------------------------------------------------------------------------------
def test_screen_counts_seed_condition_and_candidates_are_checked():
    """screen_perturbations: n_cells=8.0 and True failed in torch.randn, seed=-1 as "expected
    non-negative integer" and seed=True ran as 1; one candidate dict was read as its keys and a
    text condition was refused as "conditioning", a name the screen does not take."""
    model = drug_knockout_model(120, 12, 4, epochs=1)
    designer, up = InverseDesigner(model, observed=False), PhenotypeTarget(marker_genes={"G0": 6.0})

    def screen(**kw):
        return screen_perturbations(designer, up, **{"n_cells": 8, "steps": 3, **kw})

    pd.testing.assert_frame_equal(screen(n_cells=np.int64(8), seed=np.int64(0), steps=3.0), screen())
    seeds = r"an integer in \[0, 2\*\*32\)"
    for name, value, rule in (("n_cells", 8.0, "an integer >= 1"), ("n_cells", True, "an integer >= 1"),
                              ("seed", -1, seeds), ("seed", True, seeds)):
        with pytest.raises(ValueError, match=f"^{name} must be {rule}, got {value!r}$"):
            screen(**{name: value})
    with pytest.raises(ValueError, match=r"^candidates must be a list of condition dicts.*got \{'drug': 'D1'\}$"):
        screen(candidates={"drug": "D1"})
    with pytest.raises(ValueError, match="^condition must be a dict of covariate -> label .*got 'K1'$"):
        screen(condition="K1")


def test_gene_attribution_takes_the_condition_as_labels(model, cells):
    """``cond={'cell_type': 'B'}`` (labels, as every verb takes them) failed as "'str' object has no
    attribute 'to'": only code tensors were read; ``steps=True`` integrated over one step."""
    designer, target = InverseDesigner(model, observed=False), PhenotypeTarget(marker_genes=["GENE0"])
    source = np.asarray(cells[:4].X.todense())
    codes = {"cell_type": torch.full((4,), model.data_spec.categorical["cell_type"].index("B"))}

    def attribution(cond, **kw):
        return gene_attribution(designer, target, source, source + 0.1, cond=cond, **{"steps": 4, **kw})

    pd.testing.assert_frame_equal(attribution({"cell_type": "B"}), attribution(codes))
    with pytest.raises(ValueError, match="^steps must be an integer >= 1, got True$"):
        attribution(codes, steps=True)


def test_a_shard_rank_and_a_gene_level_given_as_booleans_are_refused(model, tmp_path):
    """generate_sharded(rank=True) wrote shard 1 of 2, and PhenotypeTarget(marker_genes={'G': True})
    asked for the level 1.0 (a NaN level for one no cell meets)."""
    for kw, message in (({"rank": True, "world_size": 2}, "rank must be an integer, got True"),
                        ({"rank": 0, "world_size": True}, "world_size must be an integer >= 1, got True")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            generate_sharded(model, 4, tmp_path / "shards", seed=0, progress=False, steps=3, **kw)
    assert not (tmp_path / "shards").exists()
    for level in (True, float("nan"), "high"):
        with pytest.raises(ValueError, match=r"the level of 'GENE0' must be a number \(log1p-normalised, finite\)"):
            PhenotypeTarget(marker_genes={"GENE0": level})
    assert PhenotypeTarget(marker_genes={"GENE0": np.float32(2.5)}).marker_genes == {"GENE0": 2.5}
