"""Generating cells as a first-time user would: labels given as codes or as pandas columns, the
engine against the plain sampler past one engine chunk, what ``uns['scidiff']`` records, and
``scidiff sample``'s ``--eta`` with samplers that have none."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import scidiff
from scidiff.cli import main
from scidiff.data import setup_anndata
from scidiff.models import ScIDiffModel
from scidiff.tasks import generate as generation
from scidiff.training import load_model
from scidiff.training.distillation import distil
from test_generate_mixture import _cells  # the same five groups

FAST = {"steps": 3, "progress": False}


@pytest.fixture(scope="module")
def cells():
    return setup_anndata(_cells(), condition_keys=["cell_type", "condition"])


@pytest.fixture(scope="module")
def model(cells):
    torch.manual_seed(0)
    return ScIDiffModel.from_data(cells, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=50).eval()


def _records(obs: pd.DataFrame) -> list:
    return obs.astype(str).to_dict("records")


def test_a_label_given_as_its_code_is_labelled_and_mixed_as_the_label(model):
    code = model.data_spec.categorical["cell_type"].index("b")
    by_label = generation.generate(model, 24, {"cell_type": "b"}, seed=2, **FAST)
    for code_form in (code, np.int64(code), torch.tensor([code]), torch.tensor(code)):
        by_code = generation.generate(model, 24, {"cell_type": code_form}, seed=2, **FAST)
        assert list(by_code.obs.columns) == ["cell_type", "condition"]  # the mixture filled the condition
        assert _records(by_code.obs) == _records(by_label.obs)
        np.testing.assert_array_equal(by_code.X, by_label.X)


def test_one_label_per_cell_as_codes_or_pandas_columns(model):
    vocab = model.data_spec.categorical["cell_type"]
    labels = ["a", "b", "b", "c"]
    ref = generation.generate(model, 4, {"cell_type": labels}, seed=1, **FAST)
    for per_cell in (pd.Series(labels, dtype="category"), pd.Categorical(labels), np.array(labels),
                     torch.tensor([vocab.index(v) for v in labels])):
        got = generation.generate(model, 4, {"cell_type": per_cell}, seed=1, **FAST)
        assert got.obs["cell_type"].astype(str).tolist() == labels
        np.testing.assert_array_equal(got.X, ref.X)


def test_bad_n_and_chunk_size_are_named(model):
    with pytest.raises(TypeError, match="n must be an integer"):
        generation.generate(model, 5.0, **FAST)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        generation.generate(model, 5, chunk_size=0, **FAST)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
def test_engine_gives_the_plain_cells_past_one_engine_chunk(model, sampler):
    # past one chunk of 1,024 cells (the plain sampler drew in 4,096 before): the draws must line up
    plain = generation.generate(model, 1100, {"cell_type": "a", "condition": "stim"}, sampler=sampler, seed=3,
                                **FAST)
    engine = generation.generate(model, 1100, {"cell_type": "a", "condition": "stim"}, sampler=sampler, seed=3,
                                 engine=True, **FAST)
    assert plain.uns["scidiff"]["observed"] and engine.uns["scidiff"]["observed"]
    np.testing.assert_allclose(engine.X, plain.X, atol=1e-5)
    small = generation.generate(model, 40, {"cell_type": "b"}, seed=3, chunk_size=16, engine=True, **FAST)
    np.testing.assert_allclose(small.X, generation.generate(model, 40, {"cell_type": "b"}, seed=3, chunk_size=16,
                                                            **FAST).X, atol=1e-5)


def test_uns_records_the_steps_walked_and_eta_only_for_ddim(model):
    every = generation.generate(model, 3, {"cell_type": "a", "condition": "ctrl"}, sampler="ddim",
                                steps=None, progress=False)
    assert every.uns["scidiff"]["steps"] == model.num_timesteps  # None: all T, not -1
    heun = generation.generate(model, 3, {"cell_type": "a", "condition": "ctrl"}, sampler="heun", eta=0.5,
                               **FAST)
    assert heun.uns["scidiff"]["eta"] == 0.0  # heun has no eta: none was applied
    ddim = generation.generate(model, 3, {"cell_type": "a", "condition": "ctrl"}, sampler="ddim", eta=0.5,
                               **FAST)
    assert ddim.uns["scidiff"]["eta"] == 0.5


@pytest.fixture(scope="module")
def run_dir(model, cells, tmp_path_factory):
    """The model with a 2-step student, saved as a run whose config samples with DDIM, eta 0.5."""
    run = tmp_path_factory.mktemp("run")
    model.student = distil(model, cells, steps=2, start_steps=4, iterations_per_round=2, batch_size=16,
                           progress=False)
    try:
        scidiff.save_model(model, run)
    finally:
        model.student = None
    (run / "config.yaml").write_text(yaml.safe_dump({"sampling": {"sampler": "ddim", "steps": 3, "eta": 0.5}}))
    return run


def test_sample_refuses_eta_for_a_sampler_without_one(run_dir, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--sampler", "dpmpp_2m", "--eta", "0.7",
                 "--out", str(out)]) == 2
    assert "--eta applies to --sampler ddim only" in capsys.readouterr().err
    assert not out.exists()


def test_the_configs_ddim_eta_does_not_follow_another_sampler(run_dir, tmp_path):
    out = tmp_path / "d.h5ad"
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--sampler", "distilled", "--out", str(out)]) == 0
    assert ad.read_h5ad(out).uns["scidiff"]["sampler"] == "distilled"
    out = tmp_path / "h.h5ad"
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--sampler", "heun", "--out", str(out)]) == 0
    assert ad.read_h5ad(out).uns["scidiff"]["eta"] == 0.0
    out = tmp_path / "c.h5ad"
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--out", str(out)]) == 0
    assert ad.read_h5ad(out).uns["scidiff"]["eta"] == 0.5  # the config's DDIM keeps its eta


def test_a_list_of_one_label_is_that_label_for_every_cell(model):
    one = generation.generate(model, 40, {"cell_type": ["b"]}, seed=5, **FAST)
    ref = generation.generate(model, 40, {"cell_type": "b"}, seed=5, **FAST)
    assert set(one.obs["condition"]) == {"ctrl", "stim"}  # b's two training groups, not one drawn for 1 cell
    assert _records(one.obs) == _records(ref.obs)
    np.testing.assert_array_equal(one.X, ref.X)


def test_the_demo_writes_its_cells_as_scidiff_sample_names_and_records_them(tmp_path, monkeypatch):
    import warnings

    import scanpy as sc

    import scidiff.tasks.demo as demo

    def tiny_train(adata, out_dir, config, epochs, progress):
        data = setup_anndata(adata.raw.to_adata(), condition_keys=["bulk_labels"], n_top_genes=40)
        torch.manual_seed(0)
        return ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=20).eval()

    metrics = {c: 0.0 for c in ["mmd", "energy_distance", "fid", "classifier_auc", "mean_correlation",
                                "var_correlation", "gene_correlation"]}
    monkeypatch.setattr(demo, "train", tiny_train)
    monkeypatch.setattr(demo, "evaluate_generation_quality", lambda *a, **k: {**metrics, "per_cell_type": {}})
    monkeypatch.setattr(demo, "report_plots", lambda *a, **k: None)
    monkeypatch.setattr(demo, "generate", lambda *a, **k: generation.generate(*a, **{**k, "steps": 2}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Observation names are not unique")
        demo.run_demo(str(tmp_path), epochs=1, seed=7, progress=False)
    generated = ad.read_h5ad(tmp_path / "generated.h5ad")
    assert generated.n_obs == sc.datasets.pbmc68k_reduced().n_obs and generated.obs_names.is_unique
    assert generated.obs_names[0] == "generated_0-0" and generated.obs_names[-1].endswith(f"-{9}")
    assert generated.uns["scidiff"]["seed"] == 7 and generated.uns["scidiff"]["steps"] == 2


def test_model_sample_takes_obs_columns_and_refuses_a_bad_number_of_cells(model):
    labels = ["a", "b", "b", "c"]
    ref = model.sample(4, {"cell_type": labels}, steps=3, seed=1)
    for column in (pd.Series(labels), pd.Series(labels, dtype="category"), pd.Categorical(labels), pd.Index(labels)):
        torch.testing.assert_close(model.sample(4, {"cell_type": column}, steps=3, seed=1), ref, rtol=0, atol=0)
    for bad in (0, -1, "3", 2.0, True):
        with pytest.raises(ValueError, match="batch_size .* must be an integer >= 1"):
            model.sample(bad, steps=3)


def test_a_seed_left_out_is_drawn_and_recorded(model):
    first = generation.generate(model, 6, {"cell_type": "a"}, seed=None, **FAST)
    seed = first.uns["scidiff"]["seed"]
    again = generation.generate(model, 6, {"cell_type": "a"}, seed=seed, **FAST)
    np.testing.assert_array_equal(first.X, again.X)
    assert generation.generate(model, 6, {"cell_type": "a"}, seed=None, **FAST).uns["scidiff"]["seed"] != seed


def test_one_condition_with_a_key_twice_and_a_student_that_cannot_halve_are_named(run_dir, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--condition", "cell_type=a,cell_type=b",
                 "--out", str(out)]) == 2
    assert "'cell_type' is given twice in 'cell_type=a,cell_type=b'" in capsys.readouterr().err
    assert main(["distil", "--model", str(run_dir), "--data", str(tmp_path / "cells.h5ad"), "--steps", "4",
                 "--start-steps", "6", "--out", str(tmp_path / "s.pt")]) == 2
    assert "--start-steps 6 with --steps 4: start_steps must be steps times a power of two" in capsys.readouterr().err
    assert not out.exists()


def test_a_merged_sharded_generation_keeps_the_gene_symbols_and_numeric_columns(tmp_path):
    """``merge_generated`` dropped the var columns (gene symbols) the shards hold, and read every
    obs column as labels (a dose, numeric in each shard, stopped the merge)."""
    a = _cells()
    a.var["gene_symbols"] = [f"SYM{i}" for i in range(a.n_vars)]
    data = setup_anndata(a, condition_keys=["cell_type"], continuous_keys=["dose"])
    torch.manual_seed(0)
    m = ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=50).eval()
    for rank in (1, 0):  # no process group: rank 0 last, as the barrier would order it
        generation.generate_sharded(m, 9, tmp_path, [{"cell_type": "b", "dose": 0.5}], rank=rank, world_size=2,
                                    merge=rank == 0, **FAST)
    merged = ad.read_h5ad(tmp_path / "generated.h5ad")
    shards = ad.concat([ad.read_h5ad(p) for p in sorted(tmp_path.glob("shard-*.h5ad"))])
    assert list(merged.var["gene_symbols"]) == [f"SYM{i}" for i in range(a.n_vars)]
    assert merged.obs["dose"].dtype.kind == "f" and (merged.obs["dose"] == 0.5).all()
    pd.testing.assert_frame_equal(merged.obs.astype(str), shards.obs.astype(str))
    with pytest.raises(IsADirectoryError, match="is a folder"):  # before any cell is drawn
        generation.generate_to_file(m, 3, tmp_path, **FAST)
    with pytest.raises(IsADirectoryError, match="is a folder"):  # a folder not made yet: the rename failed at the end
        generation.generate_to_file(m, 3, f"{tmp_path}/new/", **FAST)
    assert not (tmp_path / "new").exists()


def test_sample_says_why_its_cells_are_smooth(cells, tmp_path, capsys):
    """A model that cannot measure its cells (gene space: no detection model) wrote them smooth,
    and the closing line named ``--smooth``, a flag nobody gave."""
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(cells, latent_dim=None, hidden_dim=16, num_layers=1, num_timesteps=50)
    assert not model.resolve_observed(None)
    scidiff.save_model(model, tmp_path / "run")
    assert main(["sample", "--model", str(tmp_path / "run"), "-n", "3", "--steps", "2", "--out",
                 str(tmp_path / "s.h5ad")]) == 0
    out = capsys.readouterr().out
    assert "no detection model" in out and "--smooth" not in out


@pytest.mark.parametrize("kwargs,match", [({"sampler": "ddim", "eta": 2.0}, "eta must lie in"),
                                          ({"sampler": "ddim", "eta": -1.0}, "eta must lie in"),
                                          ({"guidance_scale": float("nan")}, "guidance_scale must be a finite"),
                                          ({"guidance_scale": float("inf")}, "guidance_scale must be a finite")])
def test_sampling_settings_that_give_nan_cells_are_refused(model, kwargs, match):
    """DDIM's eta beyond [0, 1] and a NaN or infinite guidance scale gave all-NaN cells without a
    word (the command line refused them, the Python API did not)."""
    with pytest.raises(ValueError, match=match):
        model.sample(3, {"cell_type": "b"}, steps=3, **kwargs)
    with pytest.raises(ValueError, match=match):
        generation.generate(model, 3, {"cell_type": "b"}, **{**FAST, **kwargs})


def test_generated_cells_record_their_library_size_as_a_number(model, tmp_path):
    """uns['scidiff']['target_sum'] (scidiff evaluate normalises real counts to it); it used to be only
    inside the expression note's text, which evaluate parsed. The number wins over the note; the note is
    still read for files written before."""
    from scidiff.tasks.evaluate import generated_target_sum
    cells = generation.generate(model, 3, {"cell_type": "a", "condition": "ctrl"}, **FAST)
    assert cells.uns["scidiff"]["target_sum"] == float(model.data_spec.target_sum) > 0
    cells.write_h5ad(tmp_path / "g.h5ad")
    cells = ad.read_h5ad(tmp_path / "g.h5ad")
    cells.uns["scidiff"]["target_sum"] = 1000.0
    assert generated_target_sum(cells) == 1000.0  # the note says the model's 10,000; the number is read
    del cells.uns["scidiff"]["target_sum"]
    assert generated_target_sum(cells) == float(model.data_spec.target_sum)  # an older file: the note


def test_sample_refuses_steps_the_distilled_student_does_not_walk(run_dir, tmp_path, capsys):
    """``--sampler distilled --steps 25`` wrote the student's own steps and said steps=2 in uns: model.sample
    reads its default 25 as "the student's own", so the command checks the flag it was given."""
    out = tmp_path / "d.h5ad"
    own = load_model(run_dir).student.steps
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--sampler", "distilled", "--steps", "25",
                 "--out", str(out)]) == 2
    assert f"--steps: the distilled student samples in exactly {own} steps, not 25" in capsys.readouterr().err
    assert not out.exists()
    assert main(["sample", "--model", str(run_dir), "-n", "3", "--sampler", "distilled", "--steps", str(own),
                 "--out", str(out)]) == 0
    assert ad.read_h5ad(out).uns["scidiff"]["steps"] == own


@pytest.mark.parametrize("observed", ["false", "true", 1, 0])
def test_observed_must_be_a_bool_or_none(model, observed):
    """observed='false' returned measured cells (bool('false') is True), as the ONNX runtime did."""
    with pytest.raises(ValueError, match="observed must be True, False or None"):
        model.sample(2, {"cell_type": "a", "condition": "ctrl"}, steps=2, observed=observed)
