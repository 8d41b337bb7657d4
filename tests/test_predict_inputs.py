"""Perturbation prediction as a first-time user meets it: the obs columns that describe a
perturbation or a time set from the target by ``perturb`` and by the time-course baseline (never
left at the control cell's value), an empty label refused rather than read as control, scoring
that skips a group of one real cell and matches a numeric key's ``4`` with a prediction's ``4.0``,
a trajectory that keeps the model's gene symbols, and a prediction that keeps the input's var
columns. Tiny synthetic data and models."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.evaluation.perturbation import predict_baseline
from scidiff.tasks.evaluate import evaluate_perturbation
from scidiff.tasks.screen import baseline_screen
from scidiff.tasks.trajectory import trajectory
from test_predict_screen import single_thread

GENES = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def _counts(groups: dict, seed: int = 0) -> tuple[np.ndarray, list]:
    """Poisson counts, 30 cells a group; ``groups``: name -> per-gene rate multiplier (scalar)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(2, 20, GENES)
    xs, names = [], []
    for g, (name, effect) in enumerate(groups.items()):
        rate = base * np.where(np.arange(GENES) % 3 == g % 3, effect, 1.0)
        xs.append(rng.poisson(rate, size=(30, GENES)))
        names += [name] * 30
    return np.vstack(xs).astype(np.float32), names


def _tiny(cells):
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(cells, hidden_dim=32, num_layers=2, num_timesteps=50, conditioning_dim=16,
                                           latent_dim=8)
    scidiff.ScIDiffTrainer(model, cells.loader(64, seed=0), device="cpu", progress=False, early_stopping_patience=None,
                           seed=0).train(2)
    return model


@pytest.fixture(scope="module")
def screen():
    """A knockout screen whose ``target`` column names each label's gene (``non-targeting`` for
    control), a tiny model of it and its control cells."""
    x, labels = _counts({"control": 1.0, "A": 3.0, "B": 0.3})
    obs = pd.DataFrame({"perturbation": labels,
                        "target": [{"control": "non-targeting"}.get(v, f"gene{v}") for v in labels]},
                       index=[f"c{i}" for i in range(len(labels))])
    a = ad.AnnData(X=x, obs=obs)
    a.var_names = [f"g{i}" for i in range(GENES)]
    cells = scidiff.setup_anndata(a, n_top_genes=None, perturbation_keys=["perturbation"], control_labels=["control"])
    return _tiny(cells), a[a.obs["perturbation"] == "control"][:8].copy()


@pytest.fixture(scope="module")
def course():
    """A time course (days 0, 2, 7 in ``day_num``, named in ``day``), genes as IDs with symbols in
    ``var['gene_symbols']``, a tiny model of it and day-2 cells."""
    x, labels = _counts({0.0: 1.0, 2.0: 2.0, 7.0: 4.0}, seed=1)
    obs = pd.DataFrame({"day_num": np.array(labels, float), "day": [f"d{int(v)}" for v in labels]},
                       index=[f"c{i}" for i in range(len(labels))])
    a = ad.AnnData(X=x, obs=obs)
    a.var_names = [f"ENSG{i:05d}" for i in range(GENES)]
    a.var["gene_symbols"] = [f"SYM{i}" for i in range(GENES)]
    cells = scidiff.setup_anndata(a, n_top_genes=None, continuous_keys=["day_num"])
    return _tiny(cells), a, a[a.obs["day_num"] == 2.0][:8].copy()


def test_perturb_sets_the_columns_that_describe_the_perturbation(screen, course):
    """``scidiff.perturb`` wrote ``perturbation=A`` beside the control cells' ``target``
    (``non-targeting``), and ``day_num=7`` beside ``day=d2``: the columns are set from the target
    as a screen sets them (missing where the label has no value: an unseen day, a combination)."""
    model, control = screen
    pred = scidiff.perturb(model, control, {"perturbation": "A"}, steps=5, progress=False)
    assert set(pred.obs["target"].astype(str)) == {"geneA"}
    pred = scidiff.perturb(model, control, {"perturbation": "A+B"}, steps=5, progress=False)
    assert pred.obs["target"].isna().all()
    pred = scidiff.perturb(model, control, {"perturbation": "control"}, steps=5, progress=False)
    assert set(pred.obs["target"].astype(str)) == {"non-targeting"}
    model, _, day2 = course
    pred = scidiff.perturb(model, day2, {"day_num": 7.0}, steps=5, progress=False)
    assert set(pred.obs["day"].astype(str)) == {"d7"}
    pred = scidiff.perturb(model, day2, {"day_num": 4.0}, steps=5, progress=False, method="population")
    assert pred.obs["day"].isna().all()


def test_the_linear_in_time_baseline_sets_the_day(course, tmp_path):
    """``scidiff predict --method linear --time-key day_num`` kept ``day=d2`` on cells predicted at
    day 7 (the time's describing column was never looked for): now ``d7``, missing at day 4."""
    from scidiff.cli import main

    _, train, day2 = course
    log = lambda a: ad.AnnData(X=np.log1p(a.X / a.X.sum(1, keepdims=True) * 1e4), obs=a.obs.copy(), var=a.var.copy())
    pred = baseline_screen("linear", log(train), log(day2), [{"day_num": 4.0}, {"day_num": 7.0}], time_key="day_num")
    days = pred.obs.groupby("scidiff_target", observed=True)["day"].agg(lambda s: set(s.astype(str)))
    assert days["day_num=7.0"] == {"d7"} and days["day_num=4.0"] == {"nan"}
    train.write_h5ad(tmp_path / "train.h5ad")
    day2.write_h5ad(tmp_path / "day2.h5ad")
    main(["predict", "--method", "linear", "--train", str(tmp_path / "train.h5ad"), "--data",
          str(tmp_path / "day2.h5ad"), "--time-key", "day_num", "--target", "day_num=7", "--out",
          str(tmp_path / "p.h5ad")])
    assert set(ad.read_h5ad(tmp_path / "p.h5ad").obs["day"].astype(str)) == {"d7"}


def test_an_empty_perturbation_label_is_refused(screen):
    """``--target perturbation=`` (an unset shell variable) predicted the control cells as they
    are, route ``control``, and a baseline did the same: now refused, naming the key."""
    model, control = screen
    with pytest.raises(ValueError, match="perturbation='' names no perturbation"):
        scidiff.perturb(model, control, {"perturbation": ""}, steps=5, progress=False)
    x = ad.AnnData(X=np.log1p(control.X), obs=control.obs.copy(), var=control.var.copy())
    for method in ("no-change", "mean-shift"):
        with pytest.raises(ValueError, match="perturbation=' ' names no perturbation"):
            predict_baseline(method, x, x, {"perturbation": " "}, perturbation_key="perturbation")


def _scored(labels, key="drug"):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({key: labels}, index=[f"r{i}" for i in range(len(labels))])
    a = ad.AnnData(X=rng.uniform(0, 3, (len(labels), 12)).astype(np.float32), obs=obs)
    a.var_names = [f"g{i}" for i in range(12)]
    return a


def test_scoring_skips_a_group_with_one_real_cell():
    """A perturbation with one real cell stopped the whole evaluation with scanpy's 'Could not
    calculate statistics for groups perturbed since they only contain one sample': now that group
    is skipped, saying why, and the others are scored."""
    real = _scored(["control"] * 10 + ["A"] * 6 + ["B"])
    pred = _scored(["A"] * 5 + ["B"] * 5)
    result = evaluate_perturbation(real, pred, "drug", cell_eval=False)
    assert list(result["per_perturbation"]) == ["A"]
    assert "1 real cell" in result["skipped"]["B"]


def test_a_numeric_key_matches_4_with_4_0():
    """A real file with an integer day scored against a prediction (whose day is a float, as
    ``scidiff predict`` writes a time) found no real cells for any day ('4' against '4.0'), and
    ``--control-label 2`` matched no cell of a float column: now numbers match as numbers."""
    real = _scored(np.array([2] * 8 + [4] * 6 + [7] * 6, dtype=np.int64), "day_num")
    pred = _scored(np.array([4.0] * 5 + [7.0] * 5), "day_num")
    result = evaluate_perturbation(real, pred, "day_num", "2", cell_eval=False)
    assert sorted(result["per_perturbation"]) == ["4.0", "7.0"] and not result["skipped"]
    real.obs["day_num"] = real.obs["day_num"].astype(float)
    assert sorted(evaluate_perturbation(real, pred, "day_num", "2", cell_eval=False)["per_perturbation"]) == \
        ["4.0", "7.0"]


def test_a_trajectory_keeps_the_gene_symbols(course):
    """``perturb`` writes the model's gene IDs with the training file's symbols in ``var``; a
    trajectory dropped the symbols column."""
    model, _, day2 = course
    out = trajectory(model, day2, {"day_num": [2.0, 7.0]}, steps=5, progress=False)
    single = scidiff.perturb(model, day2, {"day_num": 7.0}, steps=5, progress=False)
    assert "gene_symbols" in single.var
    pd.testing.assert_frame_equal(out.var, single.var)
    assert set(out.obs["day"].astype(str)) == {"d2", "d7"}


def test_a_missing_targets_file_is_named_by_its_flag(tmp_path):
    """``--targets-file nofile.txt`` said only "No such file or directory: 'nofile.txt'"."""
    from scidiff.cli.predict import read_targets_file

    with pytest.raises(ValueError, match=r"--targets-file '.*nofile.txt': no such file"):
        read_targets_file(str(tmp_path / "nofile.txt"))
    with pytest.raises(ValueError, match="is a folder"):
        read_targets_file(str(tmp_path))


def test_control_labels_of_a_numeric_key_are_read_as_numbers(course, tmp_path, capsys):
    """``--control-labels 2`` names day 2.0 of a float column (it was refused: no cell carries '2')."""
    from scidiff.cli import main

    _, train, day2 = course
    train.write_h5ad(tmp_path / "train.h5ad")
    day2.write_h5ad(tmp_path / "day2.h5ad")
    assert main(["predict", "--method", "mean-shift", "--train", str(tmp_path / "train.h5ad"), "--data",
                 str(tmp_path / "day2.h5ad"), "--perturbation-key", "day_num", "--control-labels", "2",
                 "--target", "day_num=7", "--out", str(tmp_path / "p.h5ad")]) == 0, capsys.readouterr().err
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.n_obs == day2.n_obs and not np.allclose(pred.X, pred.layers["control"])


def test_a_prediction_keeps_the_input_genes_var_columns(screen, tmp_path):
    """A prediction's ``var`` held the model's gene IDs alone: the control cells' own columns
    (feature types, highly-variable flags, IDs) were dropped, where ``denoise`` keeps them. Now
    they follow each gene, the input's genes in another order, in memory and in a screen's file."""
    from scidiff.cli import main

    model, control = screen
    cells = control[:, ::-1].copy()  # the input's genes in reverse order
    cells.var["feature_types"] = pd.Categorical(["Gene Expression"] * GENES)
    cells.var["highly_variable"] = np.arange(GENES)[::-1] % 2 == 0
    cells.var["gene_ids"] = [f"ID-{g}" for g in cells.var_names]
    pred = scidiff.perturb(model, cells, {"perturbation": "A"}, steps=5, progress=False)
    assert list(pred.var_names) == [f"g{i}" for i in range(GENES)]
    assert list(pred.var["gene_ids"]) == [f"ID-g{i}" for i in range(GENES)]
    assert list(pred.var["highly_variable"]) == [i % 2 == 0 for i in range(GENES)]
    cells.write_h5ad(tmp_path / "control.h5ad")
    scidiff.save_model(model, tmp_path / "model.pt")
    main(["predict", "--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "control.h5ad"), "--target",
          "perturbation=A", "--target", "perturbation=B", "--steps", "5", "--out", str(tmp_path / "p.h5ad")])
    var = ad.read_h5ad(tmp_path / "p.h5ad").var
    assert list(var["gene_ids"]) == [f"ID-g{i}" for i in range(GENES)]
    assert set(var["feature_types"]) == {"Gene Expression"}


def test_a_prediction_records_the_library_size_it_is_normalised_to(screen):
    """``scidiff evaluate --perturbation`` normalises real counts to the library size the
    prediction records; a counts-trained model's prediction recorded none."""
    model, control = screen
    pred = scidiff.perturb(model, control, {"perturbation": "A"}, steps=5, progress=False)
    assert model.data_spec.target_sum and pred.uns["scidiff_prediction"]["target_sum"] == model.data_spec.target_sum


def test_an_out_that_is_a_file_the_command_reads_is_refused(screen, tmp_path, capsys):
    """`scidiff predict --out control.h5ad` (the --data file; or --train, or a run folder's model.pt)
    replaced the user's cells with the predicted ones. Now each is refused before any work, naming
    the flag, and the file is left as it was."""
    from scidiff.cli import main

    model, control = screen
    data, train, run = tmp_path / "control.h5ad", tmp_path / "train.h5ad", tmp_path / "run"
    control.write_h5ad(data)
    control.write_h5ad(train)
    scidiff.save_model(model, run)
    kept = {p: p.read_bytes() for p in (data, train, run / "model.pt")}
    model_args = ["--model", str(run), "--target", "perturbation=A", "--steps", "2"]
    for args, flag in ((model_args + ["--out", str(data)], "--data"),
                       (model_args + ["--out", str(run / "model.pt")], "--model"),
                       (["--method", "mean-shift", "--train", str(train), "--target", "perturbation=A", "--out",
                         str(train)], "--train")):
        assert main(["predict", "--data", str(data), *args]) == 2
        assert f"is the {flag} file, which the output would replace" in capsys.readouterr().err
    assert all(p.read_bytes() == b for p, b in kept.items())


def test_a_seed_outside_the_draws_range_is_refused(screen):
    """perturb(seed=2**32) drew seed 0's numbers and seed=-1 those of 2**32 - 1 (the draws key on 32
    bits), silently; 1.5 ran as 1. Now each is refused before any work; a numpy integer or 3.0 is 3."""
    model, control = screen
    for seed in (2**32, -1, 1.5, None, True):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            scidiff.perturb(model, control, {"perturbation": "A"}, steps=2, progress=False, seed=seed)
    three = scidiff.perturb(model, control, {"perturbation": "A"}, steps=2, progress=False, seed=3, method="population")
    for same in (np.int64(3), 3.0):
        again = scidiff.perturb(model, control, {"perturbation": "A"}, steps=2, progress=False, seed=same,
                                method="population")
        np.testing.assert_array_equal(np.asarray(again.X), np.asarray(three.X))
