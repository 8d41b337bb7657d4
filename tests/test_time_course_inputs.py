"""A time course (Klein 2015 / Waddington-OT-shaped: mESCs after LIF withdrawal) as a first-time
user runs it: cells measured at uneven days, one day held out, predicted by the model and by the
linear-in-time baseline, carried across a grid of days, and scored with ``evaluate
--perturbation`` against a truth file that writes the days its own way. Days that are not whole
(Waddington-OT's half days, hours read as days) are stored as float32 by most files and by the
model, so 2.4 is 2.4000001 and 3.6 is 3.5999999. The baseline is checked against a truth that is
linear in the day (recovered exactly at a day between measured ones). Tiny synthetic data and an
untrained model (its outputs' layout and labels, not its quality, are under test); each fix
reproduced first (the test failed before it)."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.evaluation.perturbation import predict_baseline
from scidiff.tasks.evaluate import evaluate_perturbation
from scidiff.tasks.trajectory import trajectory
from test_predict_screen import single_thread

GENES = 20
DAYS = (0.0, 1.2, 2.4, 3.6)  # fractional days: none of them but 0 is a float32 exactly


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def _counts(days, n: int = 30, seed: int = 0) -> ad.AnnData:
    """Poisson counts, ``n`` cells a day, each gene's log-rate linear in the day; ``obs['day']``
    float32 as an h5ad written from float32 (or from hours / 24) holds it."""
    rng = np.random.default_rng(seed)
    base, slope = rng.uniform(3, 15, GENES), rng.normal(0, 0.3, GENES)
    x = np.vstack([rng.poisson(base * np.exp(slope * d), (n, GENES)) for d in days]).astype(np.float32)
    a = ad.AnnData(x, obs=pd.DataFrame({"day": np.repeat(np.asarray(days, np.float32), n)}))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(GENES)]
    return a


def _linear(days, n: int = 4) -> ad.AnnData:
    """log1p values exactly linear in the day, ``1 + (g + 1) d / 10`` for gene ``g``, ``n`` cells
    a day (cell ``i`` offset by ``i / 100``), ``obs['day']`` float32."""
    rows = [1 + np.arange(1, GENES + 1) * d / 10 + i / 100 for d in days for i in range(n)]
    a = ad.AnnData(np.asarray(rows, np.float32),
                   obs=pd.DataFrame({"day": np.repeat(np.asarray(days, np.float32), n)}))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(GENES)]
    return a


@pytest.fixture(scope="module")
def course():
    """``(untrained tiny model, the cells)``: a model set up on days 0, 1.2 and 3.6 (2.4 held
    out), ``obs['stage']`` naming each day (Waddington-OT's 'D1.2'); its outputs' labels and
    layout do not depend on training."""
    a = _counts(DAYS)
    a.obs["stage"] = [f"D{d:g}" for d in a.obs["day"]]
    cells = scidiff.setup_anndata(a[a.obs["day"] != np.float32(2.4)].copy(), n_top_genes=None,
                                  continuous_keys=["day"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(cells, hidden_dim=16, num_layers=1, num_timesteps=20, conditioning_dim=8,
                                           latent_dim=4)
    return model, a


def test_a_fractional_day_is_written_as_asked_and_scored(course):
    """perturb(..., {'day': 2.4}) wrote obs['day'] 2.4000000953674316 (the float32 code read
    back), so ``evaluate --perturbation`` found no real cells at it ("skipped: {'2.4000000953674316':
    'no real cells of this perturbation'}") and it disagreed with the trajectory's 2.4. Now the
    day is written as asked."""
    model, a = course
    source = a[a.obs["day"] == 0][:6].copy()
    pred = scidiff.perturb(model, source, {"day": 2.4}, steps=2, progress=False, observed=False)
    assert pred.obs["day"].tolist() == [2.4] * 6
    real = a[np.isin(a.obs["day"], np.float32([0, 2.4]))].copy()
    scored = evaluate_perturbation(real, pred, "day", "0", cell_eval=False)
    assert list(scored["per_perturbation"]) == ["2.4"] and scored["skipped"] == {}
    assert scored["per_perturbation"]["2.4"]["n_real"] == 30


def test_a_trajectory_over_the_files_own_days_is_scored_against_it(course, tmp_path):
    """A trajectory over ``np.unique(adata.obs['day'])`` (the float32 days of the file) wrote day
    2.4 as 2.4000000953674316, which the file's own day 2.4 did not match: every group was skipped
    ("no predicted perturbation has real cells to be scored against"). Now numbers are matched
    to float32 precision, as the model reads them, and named as the file writes them."""
    model, a = course
    a.write_h5ad(tmp_path / "course.h5ad")
    real = ad.read_h5ad(tmp_path / "course.h5ad")
    grid = np.unique(real.obs["day"])
    assert grid.dtype == np.float32
    path = trajectory(model, real[real.obs["day"] == 0][:4].copy(), {"day": grid}, steps=2, progress=False,
                      observed=False)
    path.write_h5ad(tmp_path / "path.h5ad")
    scored = evaluate_perturbation(real, tmp_path / "path.h5ad", "day", "0", cell_eval=False)
    assert list(scored["per_perturbation"]) == ["1.2", "2.4", "3.6"] and scored["skipped"] == {}
    assert all(row["n_real"] == 30 and row["n_predicted"] == 4 for row in scored["per_perturbation"].values())


def test_the_last_measured_fractional_day_is_no_extrapolation(course):
    """A trajectory over the measured days 0, 1.2, 2.4 and 3.6 warned "day [3.6] is outside the
    range seen in training [0, 3.6]" and recorded 3.6 as an extrapolation (3.6 against the
    measured float32 3.5999999); perturb itself did not. Now the grid is read as the model reads
    it; a day beyond 3.6 still warns."""
    model, a = course
    source = a[:2].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = trajectory(model, source, {"day": list(DAYS)}, steps=2, progress=False, observed=False)
    assert path.uns["scidiff_trajectory"]["outside_training_range"] == []
    assert path.obs["day"].tolist() == [d for d in DAYS for _ in range(2)]
    np.testing.assert_allclose(path.obs["scidiff_confidence"].to_numpy()[-2:], 30 / 60)  # day 3.6: its 30 cells
    with pytest.warns(UserWarning, match=r"day \[3\.7\] is outside the range seen in training \[0, 3\.6\]"):
        trajectory(model, source, {"day": [3.6, 3.7]}, steps=2, progress=False, observed=False)


def test_a_measured_fractional_day_keeps_its_label(course):
    """The stage that names each day ('D1.2' for day 1.2) was left missing at day 1.2 asked as
    1.2, as at a day never measured: the set-up recorded it under the float32 day's text
    '1.2000000476837158'. Now a time is looked up as the model reads it; the held-out day 2.4
    still has none."""
    model, a = course
    source = a[a.obs["day"] == 0][:2].copy()
    path = trajectory(model, source, {"day": [0, 1.2, 2.4, 3.6]}, steps=2, progress=False, observed=False)
    stage = [v if isinstance(v, str) else None for v in path.obs["stage"]]
    assert stage == ["D0"] * 2 + ["D1.2"] * 2 + [None] * 2 + ["D3.6"] * 2
    pred = scidiff.perturb(model, source, {"day": 1.2}, steps=2, progress=False, observed=False)
    assert pred.obs["stage"].astype(str).eq("D1.2").all()


def test_a_day_given_twice_in_another_precision_is_refused(course):
    """A grid of 1.2 and the file's float32 1.2 (``[1.2, *np.unique(adata.obs['day'])]``) ran
    day 1.2 twice, under one obs name 'c0@day=1.2' for two rows (the model reads both as one
    time). Now it is refused as a repeat, as 2 and '2' are."""
    model, a = course
    with pytest.raises(ValueError, match=r"the grid of 'day' repeats values: \['1\.2'\]"):
        trajectory(model, a[:2].copy(), {"day": [1.2, *np.unique(a.obs["day"])]}, steps=2, progress=False)


def test_times_that_differ_beyond_six_digits_name_their_rows_apart(course):
    """Times in seconds two weeks in (1234567 s and 1234568 s) named both time points' rows
    'c0@day=1.23457e+06' (``{t:g}``): the trajectory's obs_names repeated. Now the names keep the
    digits that tell the times apart where six do not."""
    model, a = course
    with pytest.warns(UserWarning, match="outside the range seen in training"):
        path = trajectory(model, a[:2].copy(), {"day": [1234567, 1234568]}, steps=2, progress=False, observed=False)
    assert path.obs_names.is_unique
    assert list(path.obs_names) == ["c0@day=1234567.0", "c1@day=1234567.0", "c0@day=1234568.0", "c1@day=1234568.0"]


def test_linear_in_time_at_a_measured_float32_day_and_between_uneven_days():
    """With the training file's days float32 (as h5ad from float32 or hours / 24 keeps them),
    ``--method linear`` at the last measured day 3.6 was refused: "time 3.6 lies outside the
    measured times [0.0, 1.2000000476837158, 3.5999999046325684]". Now a measured day is matched
    to float32 precision; between the uneven days 0, 1.2 and 3.6 the prediction is the closed
    form of a truth linear in the day, exactly."""
    days = (0.0, 1.2, 3.6)
    train, control = _linear(days), _linear((0.0,))
    x, t = np.asarray(train.X, np.float64), train.obs["day"].to_numpy()
    for day, truth in ((3.6, x[t == np.float32(3.6)].mean(0)), (1.2, x[t == np.float32(1.2)].mean(0)),
                       (2.4, 1 + np.arange(1, GENES + 1) * 0.24 + 0.015)):
        pred = predict_baseline("linear", train, control, {"day": day}, time_key="day")
        np.testing.assert_allclose(np.asarray(pred.X, np.float64).mean(0), truth, atol=1e-5)
    with pytest.raises(ValueError, match=r"time 3\.7 lies outside the measured times \[0, 1\.2, 3\.6\]"):
        predict_baseline("linear", train, control, {"day": 3.7}, time_key="day")


@pytest.mark.parametrize("written", ["day{:g}", "D{:g}", "d{:g}"])
def test_a_truth_file_that_writes_the_day_as_a_label(written):
    """The truth file labels its days 'day0'/'day4' (or Waddington-OT's 'D4', Klein's 'd4'); the
    prediction holds day 4.0: the day-4 group was skipped ("no real cells of this perturbation",
    or, with --control-label 0, "no real cell has day in ['0']"). Now a day's label reads as its
    number beside numbers, the control label too; the score equals that of a numeric truth."""
    a = _counts((0.0, 2.0, 4.0, 7.0))
    log = a.copy()
    log.X = np.log1p(log.X / log.X.sum(1, keepdims=True) * 1e4)
    train, control = log[log.obs["day"] != 4].copy(), log[log.obs["day"] == 0][:10].copy()
    pred = predict_baseline("linear", train, control, {"day": 4.0}, time_key="day")
    real = a[np.isin(a.obs["day"], [0, 4])].copy()
    numeric = evaluate_perturbation(real, pred, "day", "0", cell_eval=False)
    real.obs["day"] = [written.format(d) for d in real.obs["day"]]
    for control_label in ("0", written.format(0)):
        scored = evaluate_perturbation(real, pred, "day", control_label, cell_eval=False)
        assert list(scored["per_perturbation"]) == ["4.0"]
        assert scored["per_perturbation"]["4.0"]["rmse_all"] == numeric["per_perturbation"]["4.0"]["rmse_all"]


def test_the_linear_baseline_at_a_day_without_time_key(tmp_path, capsys):
    """``scidiff predict --method linear --train course.h5ad --target day=4`` (no --time-key, no
    model) was refused with "no cell of --train carries a control label ['control', 'ctrl'] in
    obs['day']", as if day were a perturbation. Now the targets' one key, numeric in --train (as
    text too), is the time, as a model's is: the prediction is the closed form at day 4 between
    days 2 and 7."""
    from scidiff.cli import main

    train = _linear((0.0, 2.0, 7.0))
    train.obs["day"] = train.obs["day"].map("{:g}".format).astype("category")  # '0', '2', '7' as labels
    train.write_h5ad(tmp_path / "train.h5ad")
    _linear((0.0,)).write_h5ad(tmp_path / "d0.h5ad")
    out = tmp_path / "linear.h5ad"
    assert main(["predict", "--method", "linear", "--train", str(tmp_path / "train.h5ad"), "--data",
                 str(tmp_path / "d0.h5ad"), "--target", "day=4", "--out", str(out)]) == 0, capsys.readouterr().err
    pred = ad.read_h5ad(out)
    np.testing.assert_allclose(np.asarray(pred.X, np.float64).mean(0), 1 + np.arange(1, GENES + 1) * 0.4 + 0.015,
                               atol=1e-5)
    assert pred.obs["day"].astype(float).eq(4.0).all()


def test_the_linear_baseline_keeps_each_batch_to_its_own_course():
    """Two batches, exactly linear in the day, batch B 1 higher and never measured at day 7: the
    linear-in-time baseline pooled every training cell per day, so day 4 of batch A's cells was
    [0.7 1.1 1.5 1.9 2.3] against the truth [0.4 0.8 1.2 1.6 2.0] (day 7 held batch A alone). Now
    each batch is interpolated in its own cells, and B, not measured around day 4, is moved by A's
    change from day 0 to day 4 (never to A's level). Days written 'D0' in the file and 'day4' in
    the target were 'could not convert string to float'; a target's day as text came back as text
    in obs beside numbers."""
    from scidiff.tasks.screen import baseline_screen

    slope = np.linspace(0.1, 0.5, 5)
    rows, obs = [], []
    for batch, offset in (("A", 0.0), ("B", 1.0)):
        for day in (0.0, 2.0) + ((7.0,) if batch == "A" else ()):
            rows.append(np.tile(offset + slope * day, (10, 1)))
            obs += [(batch, day)] * 10
    train = ad.AnnData(np.vstack(rows).astype(np.float32),
                       obs=pd.DataFrame(obs, columns=["batch", "day"], index=[f"c{i}" for i in range(len(obs))]))
    written = train.copy()
    written.obs["day"] = [f"D{d:g}" for d in written.obs["day"]]
    for data, day in ((train, 4), (written, "day4")):
        control = data[(train.obs["day"] == 0).to_numpy()].copy()
        pred = predict_baseline("linear", data, control, {"day": day}, time_key="day", context_key="batch")
        assert pred.obs["day"].dtype == float and (pred.obs["day"] == 4.0).all()
        for batch, offset in (("A", 0.0), ("B", 1.0)):
            x = np.asarray(pred.X)[(pred.obs["batch"] == batch).to_numpy()]
            np.testing.assert_allclose(x, np.broadcast_to(offset + slope * 4, x.shape), atol=1e-5)
    control = train[(train.obs["day"] == 0).to_numpy()].copy()
    screen = baseline_screen("linear", train, control, [{"day": 4}, {"day": "7"}], time_key="day",
                             context_key="batch")
    assert screen.obs["day"].dtype == float and set(screen.obs["day"]) == {4.0, 7.0}
