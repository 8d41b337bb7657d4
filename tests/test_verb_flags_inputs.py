"""Yes/no and choice arguments of every public verb, and where scidiff's warnings point.

A notebook user writes ``progress='no'``, ``use_raw='false'``, ``merge=0``: any non-empty text
(and any non-zero number) reads as true, so the call did the opposite of what was asked, or a
``'no'`` reached a check written for another case (``cuda_graph='no'`` was "cuda_graph=True needs
a CUDA device"). Checked here: each yes/no argument of the verbs (generate and its file and
sharded forms, perturb, denoise, the screen, the trajectory, the demo, design and the designer,
the engine, ``model.sample``, the trainer, ``transform_like``, ``setup_streaming``) is refused at
the verb's entry, before any work or file, with ``"<name> must be True or False, got 'no'"``
(``"True, False or None (<what None means>)"`` where ``None`` is a choice), numpy bools are
taken; sampler and method names outside the choices (``'DDIM'``, a misspelling) are one
``ValueError`` listing them: ``"unknown <what> 'X'; choose one of [...]"``. And a warning of a
verb (a label with few cells, a column with one value, left-out features, an unmatched control
label, a time outside the training range, a missing covariate column, a deprecated keyword)
points at the caller's line, not at a line inside the package, through ``scidiff.train`` too.
"""
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scidiff
from scidiff.config import load_config
from scidiff.data import setup_streaming
from scidiff.tasks.demo import run_demo
from scidiff.tasks.design import (InverseDesigner, PhenotypeTarget, gene_attribution, run_design,
                                  screen_perturbations, tf_activity_change)
from scidiff.tasks.generate import generate_sharded, generate_to_file
from scidiff.tasks.screen import predict_screen, predict_screen_to_file
from scidiff.tasks.trajectory import trajectory
from test_api_types_inputs import timed_cells, timed_model
from test_predict_screen import single_thread
from training_helpers import TRAIN_KW, synthetic_cells, tiny_model

STIM = {"condition": "stim"}
B = {"cell_type": "B"}


def _flag(name: str, none: str | None = None) -> str:
    choices = "True or False" if none is None else rf"True, False or None \({none}\)"
    return rf"^{name} must be {choices}, got 'no'$"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def cells():
    return timed_cells()


@pytest.fixture(scope="module")
def model(cells, tmp_path_factory):
    return timed_model(cells, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def control(cells):
    return cells[cells.obs["condition"] == "control"][:12].copy()


# -- yes/no arguments --------------------------------------------------------------------------------------------
GENERATE = [("generate", "progress", None), ("generate_to_file", "progress", None),
            ("generate_sharded", "progress", None), ("generate_sharded", "merge", None)]
GENERATE += [(verb, "observed", "measured where the model can")
             for verb in ("generate", "generate_to_file", "generate_sharded")]


@pytest.mark.parametrize("verb,name,none", GENERATE)
def test_generate_flags_given_as_text_are_refused_before_any_file(model, tmp_path, verb, name, none):
    """``progress='no'`` drew with progress bars and ``merge='no'`` merged the shards."""
    out = tmp_path / "out"
    call = {"generate": lambda **kw: scidiff.generate(model, 4, B, **kw),
            "generate_to_file": lambda **kw: generate_to_file(model, 4, out, [B], **kw),
            "generate_sharded": lambda **kw: generate_sharded(model, 4, out, [B], **kw)}[verb]
    with pytest.raises(ValueError, match=_flag(name, none)):
        call(**{"steps": 2, "progress": False, name: "no"})
    assert not out.exists()
    call(**{"steps": 2, "progress": False, name: np.False_})  # numpy's bool is a bool


CELLS = [(verb, "progress", None) for verb in ("perturb", "predict_perturbation", "denoise", "predict_screen",
                                                "predict_screen_to_file", "trajectory")]
CELLS += [(verb, "use_raw", "where the model's training cells were read")
          for verb in ("perturb", "predict_perturbation", "denoise", "predict_screen", "trajectory")]


@pytest.mark.parametrize("verb,name,none", CELLS)
def test_flags_of_the_verbs_on_cells_given_as_text_are_refused(model, control, tmp_path, verb, name, none):
    """``use_raw='no'`` read ``.raw`` (any non-empty text is true) and ``progress='no'`` showed bars."""
    out = tmp_path / "screen.h5ad"
    call = {"perturb": lambda **kw: scidiff.perturb(model, control, STIM, **kw),
            "predict_perturbation": lambda **kw: scidiff.predict_perturbation(model, control, STIM, **kw),
            "denoise": lambda **kw: scidiff.denoise(model, control, **kw),
            "predict_screen": lambda **kw: predict_screen(model, control, [STIM], **kw),
            "predict_screen_to_file": lambda **kw: predict_screen_to_file(model, control, [STIM], out, **kw),
            "trajectory": lambda **kw: trajectory(model, control, {"time": [0.0, 1.0]}, **kw)}[verb]
    with pytest.raises(ValueError, match=_flag(name, none)):
        call(**{"steps": 2, "progress": False, name: "no"})
    assert not out.exists()


def test_transform_like_use_raw_given_as_text_is_refused(model, control):
    with pytest.raises(ValueError, match=_flag("use_raw", "where the model's training cells were read")):
        scidiff.transform_like(model.data_spec, control, use_raw="no")


@pytest.mark.parametrize("name", ["use_raw", "covariance", "progress"])
def test_streamed_setup_flags_given_as_text_are_refused(cells, tmp_path, name):
    """``setup_streaming(path, use_raw='no')`` read ``.raw``."""
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    with pytest.raises(ValueError, match=_flag(name)):
        setup_streaming(path, n_top_genes=20, **{name: "no"})


SAMPLING = [("model.sample", "progress"), ("model.sample", "return_expression"), ("engine.sample", "progress"),
            ("engine.sample", "return_expression"), ("engine.sample", "to_cpu"), ("engine.stream", "progress"),
            ("engine.stream", "return_expression"), ("engine.stream", "to_cpu")]


@pytest.mark.parametrize("verb,name", SAMPLING)
def test_sampling_flags_given_as_text_are_refused(model, verb, name):
    """``return_expression='no'`` gave expression, ``to_cpu='no'`` moved the cells to the CPU."""
    call = {"model.sample": lambda **kw: model.sample(2, B, steps=2, **kw),
            "engine.sample": lambda **kw: scidiff.SamplingEngine(model, "ddim", 2).sample(2, B, **kw),
            "engine.stream": lambda **kw: list(scidiff.SamplingEngine(model, "ddim", 2).stream(2, B, **kw))}[verb]
    with pytest.raises(ValueError, match=_flag(name)):
        call(**{name: "no"})


def test_the_engine_cuda_graph_given_as_text_is_refused_as_a_flag(model):
    """``cuda_graph='no'`` was read as True: "cuda_graph=True needs a CUDA device"."""
    with pytest.raises(ValueError, match=_flag("cuda_graph", "captured on CUDA")):
        scidiff.SamplingEngine(model, "ddim", 2, cuda_graph="no")


DESIGN = [("design", "progress", None), ("InverseDesigner", "observed", "measured where the model can")]
DESIGN += [("designer.design", name, None) for name in ("normalize", "condition_measurement", "reweight_measurement",
                                                         "record_path", "progress")]
DESIGN += [("designer.design", "resample", "on without a source"), ("screen_perturbations", "progress", None),
           ("gene_attribution", "through_model", None), ("tf_activity_change", "paired", "when the counts match")]
DESIGN += [("run_design", name, None) for name in ("condition_measurement", "screen", "attribution", "progress")]


@pytest.mark.parametrize("verb,name,none", DESIGN)
def test_design_flags_given_as_text_are_refused(model, tmp_path, verb, name, none):
    """``record_path='no'`` recorded the path, ``screen='no'`` ran the screen, ``paired='no'`` paired."""
    target = PhenotypeTarget.parse("GENE0>=1")
    x = np.ones((3, len(model.data_spec.gene_names)), np.float32)
    network = pd.DataFrame({"source": ["TF"] * 5, "target": [f"GENE{i}" for i in range(5)], "weight": 1.0})
    call = {"design": lambda **kw: scidiff.design(model, "GENE0>=1", n=2, steps=2, retries=0, **kw),
            "InverseDesigner": lambda **kw: InverseDesigner(model, **kw),
            "designer.design": lambda **kw: InverseDesigner(model).design(target, 2, steps=2, **kw),
            "screen_perturbations": lambda **kw: screen_perturbations(InverseDesigner(model), target, n_cells=2,
                                                                      steps=2, **kw),
            "gene_attribution": lambda **kw: gene_attribution(InverseDesigner(model), target, x, x, steps=2, **kw),
            "tf_activity_change": lambda **kw: tf_activity_change(x, x, network, model.data_spec.gene_names, **kw),
            "run_design": lambda **kw: run_design(model, "GENE0>=1", tmp_path / "design", n=2, steps=2,
                                                  **{"progress": False, **kw})}[verb]
    with pytest.raises(ValueError, match=_flag(name, none)):
        call(**{name: "no"})
    assert not (tmp_path / "design").exists()


TRAINER = ("progress", "use_ddp", "gradient_checkpointing", "find_unused_parameters")


@pytest.mark.parametrize("name", TRAINER)
def test_trainer_flags_given_as_text_are_refused(name):
    """``use_ddp='no'`` started a process group, ``gradient_checkpointing='no'`` checkpointed."""
    data = synthetic_cells(32)
    with pytest.raises(ValueError, match=_flag(name)):
        scidiff.ScIDiffTrainer(tiny_model(data), data.loader(16), **{**TRAIN_KW, name: "no"})


@pytest.mark.parametrize("name,none", [("progress", None), ("observed", "measured where the model can")])
def test_the_demo_refuses_a_flag_given_as_text_before_training(tmp_path, name, none):
    with pytest.raises(ValueError, match=_flag(name, none)):
        run_demo(str(tmp_path / "demo"), epochs=1, **{name: "no"})
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("verb,name", [("evaluate_files", "plots"), ("evaluate_files", "use_raw"),
                                       ("evaluate_perturbation", "use_raw")])
def test_evaluate_flags_given_as_text_are_refused(cells, tmp_path, verb, name):
    from scidiff.tasks.evaluate import evaluate_files, evaluate_perturbation

    call = {"evaluate_files": lambda **kw: evaluate_files(cells, cells, tmp_path / "ev", **kw),
            "evaluate_perturbation": lambda **kw: evaluate_perturbation(cells, cells, "condition",
                                                                        out_dir=tmp_path / "ev", **kw)}[verb]
    with pytest.raises(ValueError, match=_flag(name)):
        call(**{name: "no"})
    assert not (tmp_path / "ev").exists()


# -- choices given as text -----------------------------------------------------------------------------------------
SAMPLERS = r"\['ddim', 'ddpm', 'distilled', 'dpmpp_2m', 'euler_maruyama', 'heun'\]"


@pytest.mark.parametrize("verb,name,value,choices", [
    ("generate", "sampler", "DDIM", SAMPLERS), ("model.sample", "sampler", "DDIM", SAMPLERS),
    ("engine", "sampler", "ddim ", SAMPLERS), ("design", "sampler", "DDIM", SAMPLERS),
    ("perturb", "method", "counterfactal", r"\['counterfactual', 'population'\]"),
    ("predict_screen", "method", "Population", r"\['counterfactual', 'population'\]"),
    ("denoise", "method", "SDEdit", r"\['sdedit', 'posterior'\]"),
    ("tf_activity_change", "method", "ULM", r"\['ulm', 'wmean'\]")])
def test_a_choice_outside_its_choices_is_refused_listing_them(model, control, verb, name, value, choices):
    x = np.ones((3, len(model.data_spec.gene_names)), np.float32)
    network = pd.DataFrame({"source": ["TF"] * 5, "target": [f"GENE{i}" for i in range(5)], "weight": 1.0})
    call = {"generate": lambda **kw: scidiff.generate(model, 2, B, steps=2, progress=False, **kw),
            "model.sample": lambda **kw: model.sample(2, B, steps=2, **kw),
            "engine": lambda sampler: scidiff.SamplingEngine(model, sampler, 2),
            "design": lambda **kw: scidiff.design(model, "GENE0>=1", n=2, steps=2, retries=0, **kw),
            "perturb": lambda **kw: scidiff.perturb(model, control, STIM, steps=2, progress=False, **kw),
            "predict_screen": lambda **kw: predict_screen(model, control, [STIM], steps=2, progress=False, **kw),
            "denoise": lambda **kw: scidiff.denoise(model, control, steps=2, progress=False, **kw),
            "tf_activity_change": lambda **kw: tf_activity_change(x, x, network, model.data_spec.gene_names,
                                                                  **kw)}[verb]
    what = {"method": "method"}.get(name, name) if verb != "tf_activity_change" else "TF scoring method"
    with pytest.raises(ValueError, match=rf"^unknown {what} {value!r}; choose one of {choices}$"):
        call(**{name: value})


# -- warnings point at the caller's line ---------------------------------------------------------------------------
def _few_cells(cells):
    adata = cells.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[:2], "cell_type"] = "rare"
    return lambda: scidiff.setup_anndata(adata, n_top_genes=20, condition_keys=["cell_type"])


def _one_value(cells):
    adata = cells.copy()
    adata.obs["batch"] = "b1"
    return lambda: scidiff.setup_anndata(adata, n_top_genes=20, condition_keys=["batch", "cell_type"])


def _other_features(cells):
    x = cells.layers["counts"].toarray()
    adata = ad.AnnData(np.hstack([x, x[:, :2] * 50]), obs=cells.obs.copy(),
                       var=pd.DataFrame({"feature_types": ["Gene Expression"] * x.shape[1] + ["Antibody Capture"] * 2},
                                        index=list(cells.var_names) + ["CD3", "CD4"]))
    return lambda: scidiff.setup_anndata(adata, n_top_genes=20)


def _control_typo(cells):
    return lambda: scidiff.setup_anndata(cells, n_top_genes=20, perturbation_keys=["condition"],
                                         control_labels=["control", "ctrl_typo"])


WARNINGS = {"few cells": (_few_cells, "value(s) with fewer than 10 cells"),
            "one value": (_one_value, "has one value ('b1') for every cell"),
            "other features": (_other_features, "left out 2 'Antibody Capture' feature(s)"),
            "control label": (_control_typo, "control label(s) ['ctrl_typo']")}


@pytest.mark.parametrize("case", sorted(WARNINGS))
def test_a_setup_warning_points_at_the_callers_line(cells, case):
    make, said = WARNINGS[case]
    call = make(cells)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if said in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    assert [os.path.basename(w.filename) for w in ours] == [os.path.basename(__file__)] * len(ours)


def test_the_warnings_of_the_verbs_point_at_the_callers_line(model, cells, control, tmp_path):
    """Through ``scidiff.train`` the few-cells warning named tasks/train.py; the stacklevels counted
    for one path were wrong on another."""
    rare = cells.copy()
    rare.obs["cell_type"] = rare.obs["cell_type"].astype(str)
    rare.obs.loc[rare.obs_names[:2], "cell_type"] = "rare"
    config = load_config(overrides={"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 20},
                                    "training": {"num_epochs": 1, "batch_size": 64, "warmup_steps": 1}})
    bare = control.copy()
    del bare.obs["cell_type"]
    calls = {"value(s) with fewer than 10 cells": lambda: scidiff.train(rare, str(tmp_path / "rare"), config,
                                                                        condition_keys=["cell_type"], progress=False),
             "outside the range seen in training": lambda: scidiff.generate(model, 2, {**B, "time": 9.0}, steps=2,
                                                                             progress=False),
             "the trajectory there is an extrapolation": lambda: trajectory(model, control, {"time": [0.0, 9.0]},
                                                                            steps=2, progress=False),
             "of the model's covariates": lambda: scidiff.denoise(model, bare, steps=2, progress=False),
             "generate(conditioning=...) is deprecated": lambda: scidiff.generate(model, 2, conditioning=B, steps=2,
                                                                                 progress=False),
             "design(num_samples=...) is deprecated": lambda: InverseDesigner(model).design(
                 PhenotypeTarget.parse("GENE0>=1"), num_samples=2, steps=2)}
    for said, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ours = [w for w in caught if said in str(w.message)]
        assert ours, (said, [str(w.message) for w in caught])
        assert {w.filename for w in ours} == {__file__}, said
