"""Trajectories over time: the same day-2 cells of Klein et al. 2015 (mESC after LIF withdrawal)
carried across a grid of days by a tiny model trained without day 4; the layout of the result,
determinism, the warning for times outside training, and errors that name the problem."""
import warnings

import numpy as np
import pytest
import torch

from scidiff.data import setup_anndata
from scidiff.models import ScIDiffModel
from scidiff.tasks.perturb import perturb
from scidiff.tasks.trajectory import trajectory
from scidiff.training import ScIDiffTrainer

from shared_data import shared_file


@pytest.fixture(scope="module")
def klein():
    """``(model trained without day 4, 24 day-2 cells)``: 150 genes, a tiny network, 10 epochs."""
    import anndata as ad

    a = ad.read_h5ad(shared_file("klein15_mesc_lif_timecourse_tmscc.h5ad"))
    day = a.obs["day_num"].to_numpy()
    cells = setup_anndata(a[day != 4].copy(), n_top_genes=150, continuous_keys=["day_num"], condition_keys=["day"])
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(cells, hidden_dim=32, num_layers=2, num_timesteps=50, conditioning_dim=16,
                                   latent_dim=16)
    ScIDiffTrainer(model, cells.loader(128, seed=0), device="cpu", progress=False, early_stopping_patience=None,
                   learning_rate=2e-3, warmup_steps=5, seed=0).train(10)
    source = a[np.flatnonzero(day == 2)[:24]].copy()
    return model, source


def test_the_same_cells_are_carried_across_the_grid(klein):
    model, source = klein
    grid = [2.0, 4.0, 7.0]
    out = trajectory(model, source, {"day_num": grid}, steps=10, progress=False)
    n = source.n_obs
    assert out.shape == (n * len(grid), 150) and list(out.var_names) == list(model.data_spec.gene_names)
    np.testing.assert_array_equal(out.obs["day_num"].to_numpy(), np.repeat(grid, n))
    names = [str(v) for v in source.obs_names]
    assert out.obs["scidiff_source_cell"].tolist() == names * len(grid)
    assert out.obs_names[n] == f"{names[0]}@day_num=4" and out.obs_names.is_unique
    control = np.asarray(out.layers["control"])
    np.testing.assert_array_equal(control[:n], control[n:2 * n])  # each row's source cell, per time
    assert np.all(np.isfinite(out.X)) and out.X.min() >= 0
    assert not np.allclose(out.X[:n], out.X[2 * n:])  # day 7 is not day 2
    info = out.uns["scidiff_trajectory"]
    assert info["key"] == "day_num" and info["times"] == grid and info["n_cells"] == n
    assert info["training_range"] == [0.0, 7.0] and info["outside_training_range"] == []
    assert out.obs["day"].astype(str).eq("d2").all()  # the cells' other covariates are kept
    again = trajectory(model, source, {"day_num": grid}, steps=10, progress=False)
    np.testing.assert_array_equal(again.X, out.X)  # deterministic
    for i, t in enumerate(grid):  # the cells inverted once for all times: each time as a call on its own
        single = perturb(model, source, {"day_num": t}, steps=10, progress=False)
        np.testing.assert_array_equal(out.X[i * n:(i + 1) * n], single.X)


def test_a_time_outside_training_warns_once_naming_the_range(klein):
    model, source = klein
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = trajectory(model, source[:4], {"day_num": [4.0, 9.0, 12.0]}, steps=5, progress=False)
    said = [str(w.message) for w in caught if "outside the range" in str(w.message)]
    assert len(said) == 1 and "[9.0, 12.0]" in said[0] and "[0, 7]" in said[0]
    assert out.uns["scidiff_trajectory"]["outside_training_range"] == [9.0, 12.0]


@pytest.mark.parametrize("times,condition,match", [
    ({"day": [2.0]}, None, "'day' is a categorical covariate"),
    ({"hour": [2.0]}, None, "'hour' is not a covariate of the model"),
    ({"day_num": []}, None, "grid of 'day_num' is empty"),
    ({"day_num": [2.0, "x"]}, None, "holds 'x', not a number"),
    ({"day_num": [2.0, float("nan")]}, None, "not a finite number"),
    ({"day_num": [2.0, 2.0]}, None, "repeats values"),
    ({"day_num": [2.0], "day": [1.0]}, None, "one numeric covariate"),
    ({"day_num": [2.0]}, {"day_num": 3.0}, "both the trajectory's axis and in condition"),
])
def test_bad_grids_are_refused_by_name(klein, times, condition, match):
    model, source = klein
    with pytest.raises(ValueError, match=match):
        trajectory(model, source, times, condition=condition, steps=2, progress=False)


def test_a_column_that_names_the_day_follows_the_time(tmp_path):
    """Trained on day_num alone, Klein's ``day`` (d0, d2, d7) describes the time: a trajectory's
    cells at a measured day carry its name, at day 4 (never measured) none, never the source cells'
    d2; ``scidiff predict`` over days does the same."""
    import anndata as ad

    from scidiff.cli import main
    from scidiff.training import save_model

    a = ad.read_h5ad(shared_file("klein15_mesc_lif_timecourse_tmscc.h5ad"))
    day = a.obs["day_num"].to_numpy()
    cells = setup_anndata(a[day != 4].copy(), n_top_genes=100, continuous_keys=["day_num"])
    assert cells.spec.perturbation_columns["day_num"] == {"day": {"0.0": "d0", "2.0": "d2", "7.0": "d7"}}
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(cells, hidden_dim=32, num_layers=2, num_timesteps=50, conditioning_dim=16,
                                   latent_dim=8)
    source = a[np.flatnonzero(day == 2)[:10]].copy()
    out = trajectory(model, source, {"day_num": [0, 4.0, 7.0]}, steps=5, progress=False)
    assert [v if isinstance(v, str) else None for v in out.obs["day"]] == ["d0"] * 10 + [None] * 10 + ["d7"] * 10
    source.write_h5ad(tmp_path / "d2.h5ad")
    save_model(model, tmp_path / "run")
    assert main(["predict", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "d2.h5ad"), "--steps", "5",
                 "--target", "day_num=4", "--out", str(tmp_path / "d4.h5ad")]) == 0
    assert "day" not in ad.read_h5ad(tmp_path / "d4.h5ad").obs.columns  # no name for day 4, and not d2


def test_a_time_between_measured_days_rests_on_both_and_none_beyond():
    """The ``direct`` route's confidence: the training cells of the group asked for, ``n / (n + 30)``,
    read linearly between the days measured in that group's line. Line L1 was measured at days 0,
    2 and 7 (20, 40, 60 cells), L2 at 0 and 4: L1 at day 4 rests on its days 2 and 7 (0.6 x 40 +
    0.4 x 60 cells; read between the days of both lines, it rested on none, since L2's day 4 lay
    between), L2 at day 4 on its own 30 cells, L2 at day 6 (beyond L2's days, inside L1's) on none."""
    import anndata as ad
    import pandas as pd

    from scidiff.tasks.perturb import direct_support

    design = [("L1", 0.0, 20), ("L1", 2.0, 40), ("L1", 7.0, 60), ("L2", 0.0, 50), ("L2", 4.0, 30)]
    obs = pd.DataFrame([(line, day) for line, day, n in design for _ in range(n)], columns=["line", "day_num"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    counts = np.random.default_rng(0).poisson(2.0, (len(obs), 12)).astype(np.float32)
    spec = setup_anndata(ad.AnnData(counts, obs=obs), n_top_genes=None, condition_keys=["line"],
                         continuous_keys=["day_num"]).spec
    asked = [("L1", 4.0), ("L1", 2.0), ("L2", 4.0), ("L2", 6.0), ("L1", 1.0)]
    codes = spec.encode_conditions({"line": [a for a, _ in asked], "day_num": [d for _, d in asked]}, len(asked))
    n = np.array([0.6 * 40 + 0.4 * 60, 40, 30, 0, 0.5 * 20 + 0.5 * 40])
    np.testing.assert_allclose(direct_support(spec, codes).numpy(), n / (n + 30), rtol=1e-6)


def test_a_time_course_reads_the_groups_of_the_line_its_cells_keep(klein):
    """In a trajectory the cells keep their other covariates (here ``day`` d2, a label measured at
    day 2 alone), so its confidence counts the d2 group at day 2 and nothing at the days d2 never
    had (4, 7 and 9)."""
    import anndata as ad

    model, source = klein
    obs = ad.read_h5ad(shared_file("klein15_mesc_lif_timecourse_tmscc.h5ad"), backed="r").obs
    n2 = float((obs["day_num"] == 2).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # day 9 is outside training
        out = trajectory(model, source[:3], {"day_num": [2.0, 4.0, 7.0, 9.0]}, steps=5, progress=False)
    assert out.obs["scidiff_route"].astype(str).eq("direct").all()
    conf = out.obs["scidiff_confidence"].to_numpy().reshape(4, 3)
    expected = [n2 / (n2 + 30), 0.0, 0.0, 0.0]
    np.testing.assert_allclose(conf, np.repeat(np.array(expected)[:, None], 3, 1), rtol=1e-6)
