"""Unseen perturbations from prior knowledge, and time courses, as a first-time user meets them:
an unseen drug asked for at a time (and along a trajectory) keeps the prior's effect, a dose of 0
of an unseen drug is no change, a negative or NaN dose is refused, an unseen drug named twice
counts once, another spelling of control ('ctrl') is named as such, a time given as its label
('d2') or as a range, a feature table without a header or with a row repeated, a SMILES list
whose header names another SMILES column. Tiny synthetic data and models; each fix reproduced
first (the test failed before it)."""
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.data.perturbation_features import morgan_fingerprints, read_feature_tsv
from scidiff.models.perturbation_prior import PerturbationPrior
from scidiff.tasks.trajectory import trajectory
from test_predict_screen import single_thread

GENES = 16
DRUGS = ["dA", "dB", "dC", "dD", "dE"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def _screen(extra: str, values: tuple, tmp_path_factory):
    """Five drugs and control, 20 cells a group at each of ``values`` of the numeric covariate
    ``extra`` (a dose: the drugs at each value, their log-effect times ``2 v / (v + 10)``, control
    at 0; or a day), the drugs' effects linear in 3 features; a tiny model trained one epoch, its
    prior from a feature table that also describes ``dNew``. Returns ``(model, cells, control
    cells)``."""
    rng = np.random.default_rng(0)
    base = rng.uniform(2, 20, GENES)
    feat = {d: rng.normal(size=3) for d in DRUGS + ["dNew"]}
    w = 0.4 * rng.normal(size=(3, GENES))
    xs, obs = [], []
    for drug in ["control"] + DRUGS:
        for v in values:
            value = (0.0 if drug == "control" else v) if extra == "dose" else v
            hill = 2 * value / (value + 10) if extra == "dose" else 1.0
            effect = np.exp(hill * feat[drug] @ w) if drug != "control" else 1.0
            xs.append(rng.poisson(base * effect * (1 + 0.5 * value * (extra == "day")), (20, GENES)))
            obs += [(drug, value)] * 20
    a = ad.AnnData(np.vstack(xs).astype(np.float32), obs=pd.DataFrame(obs, columns=["drug", extra]))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(GENES)]
    if extra == "day":
        a.obs["day_label"] = [f"d{int(v)}" for v in a.obs["day"]]
    keys = {"dose_key": "dose"} if extra == "dose" else {"continuous_keys": ["day"]}
    cells = scidiff.setup_anndata(a, n_top_genes=None, perturbation_keys=["drug"], control_labels=["control"],
                                  **keys)
    tsv = tmp_path_factory.mktemp(extra) / "features.tsv"
    tsv.write_text("label\tf1\tf2\tf3\n" + "".join(f"{d}\t" + "\t".join(map(str, v)) + "\n" for d, v in feat.items()))
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(cells, hidden_dim=16, num_layers=1, num_timesteps=20, conditioning_dim=8,
                                           latent_dim=4)
    scidiff.ScIDiffTrainer(model, cells.loader(64, seed=0), device="cpu", progress=False,
                           early_stopping_patience=None, seed=0).train(1)
    model.perturbation_prior = PerturbationPrior.from_cells(cells, a, perturbation_features=str(tsv))
    assert model.perturbation_prior.report()["drug"]["shrink"] > 0  # the map is on: the effect is not zero
    control = a[(a.obs["drug"] == "control").to_numpy() & (a.obs[extra] == 0).to_numpy()][:6].copy()
    return model, a, control


@pytest.fixture(scope="module")
def dosed(tmp_path_factory):
    return _screen("dose", (10.0,), tmp_path_factory)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return _screen("day", (0.0, 2.0), tmp_path_factory)


def _shifted(model, cells, target):
    return scidiff.perturb(model, cells, target, steps=3, progress=False, observed=False)


def test_an_unseen_drug_at_a_time_keeps_the_prior_effect(course):
    """{'drug': 'dNew', 'day': 2} was decoded under day 2 alone: the unseen drug was dropped (the
    cells were those of {'day': 2}, route 'direct', obs still saying dNew). Now the prior's effect
    is added to the change the time makes (route 'direct+prior'), its confidence the lower of the
    two."""
    model, _, control = course
    effect, conf, _ = model.perturbation_prior.predict("drug", "dNew")
    assert np.abs(effect).max() > 0.05
    timed = _shifted(model, control, {"day": 2.0})
    both = _shifted(model, control, {"drug": "dNew", "day": 2.0})
    assert set(both.obs["scidiff_route"]) == {"direct+prior"} and (both.obs["drug"] == "dNew").all()
    x, y = np.asarray(both.X), np.asarray(timed.X)
    clear = (x > 0) & (y > 0)
    assert clear.mean() > 0.9
    np.testing.assert_allclose((x - y)[clear], np.broadcast_to(effect, x.shape)[clear], atol=1e-4)
    np.testing.assert_allclose(both.obs["scidiff_confidence"], np.minimum(timed.obs["scidiff_confidence"], conf),
                               rtol=1e-6)
    # a trajectory under the unseen drug: each time as perturb under the drug at that time
    path = trajectory(model, control, {"day": [0, 2]}, condition={"drug": "dNew"}, steps=3, progress=False,
                      observed=False)
    n = control.n_obs
    np.testing.assert_allclose(np.asarray(path.X)[n:], x, atol=1e-5)
    assert set(path.obs["scidiff_route"]) == {"direct+prior"}


def test_a_dose_of_zero_of_an_unseen_drug_is_no_change(dosed):
    """A seen drug at dose 0 changes nothing; an unseen one took the prior's whole effect at dose
    0 as at dose 10 (and stated the prior's confidence). Now dose 0 gives the cells as they are,
    confidence 1; dose 10 keeps the prior's effect."""
    model, _, control = dosed
    effect, conf, _ = model.perturbation_prior.predict("drug", "dNew")
    zero = _shifted(model, control, {"drug": "dNew", "dose": 0.0})
    np.testing.assert_allclose(np.asarray(zero.X), np.asarray(zero.layers["control"]), atol=1e-5)
    assert (zero.obs["scidiff_confidence"] == 1.0).all()
    ten = _shifted(model, control, {"drug": "dNew", "dose": 10.0})
    x, c = np.asarray(ten.X), np.asarray(ten.layers["control"])
    np.testing.assert_allclose(x, np.maximum(c + effect, 0), atol=1e-4)
    np.testing.assert_allclose(ten.obs["scidiff_confidence"], conf, rtol=1e-6)


def test_a_time_given_as_text_or_as_its_label(course, tmp_path, capsys):
    """perturb(..., {'day': 'd2'}) and {'day': '2'} ended in torch's "new(): invalid data type
    'str'"; a trajectory over range(0, 3) or a pandas Index was refused as "holds range(0, 3), not
    a number"; scidiff predict --target day=d2 said "day must be a number". Now a time's text and
    the label the training cells' obs gives it (day_label 'd2' for day 2) are read as that time,
    and any other text is refused naming the labels."""
    from scidiff.cli import main
    from scidiff.training import save_model

    model, _, control = course
    by_number = _shifted(model, control, {"day": 2.0})
    for value in ("d2", "2", " D2 "):
        np.testing.assert_array_equal(np.asarray(_shifted(model, control, {"day": value}).X), np.asarray(by_number.X))
    with pytest.raises(ValueError, match=r"day='d4' is not a number nor a label of a measured day \(day_label: "
                                         r"'d0' = 0, 'd2' = 2\)"):
        _shifted(model, control, {"day": "d4"})
    for grid in (range(0, 3), pd.Index([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0]), ["d0", 1, "d2"]):
        out = trajectory(model, control[:2], {"day": grid}, steps=2, progress=False, observed=False)
        assert out.uns["scidiff_trajectory"]["times"] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"the grid of 'day' holds 'x', not a number nor a label"):
        trajectory(model, control, {"day": [0, "x"]}, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"'day_label' is not a covariate of the model; .* \('day_label' names the "
                                         r"times of 'day' in the training cells: give \{'day': \[\.\.\.\]\}"):
        trajectory(model, control, {"day_label": ["d0", "d2"]}, steps=2, progress=False)
    run, data = tmp_path / "run", tmp_path / "control.h5ad"
    save_model(model, run)
    control.write_h5ad(data)
    out = tmp_path / "d2.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(data), "--target", "day=d2", "--steps", "3",
                 "--shifted", "--out", str(out)]) == 0, capsys.readouterr().err
    np.testing.assert_allclose(np.asarray(ad.read_h5ad(out).X), np.asarray(by_number.X), atol=1e-6)
    assert main(["predict", "--model", str(run), "--data", str(data), "--target", "day=week2", "--out",
                 str(tmp_path / "no.h5ad")]) == 2
    assert "--target 'day=week2': day='week2' is not a number nor a label" in capsys.readouterr().err


def test_a_feature_table_without_a_header_or_with_a_row_repeated(tmp_path):
    """A TSV without a header lost its first label silently (the row became the header, its values
    column names); a row listed twice alike (tables joined) was refused. Now the first row of
    values is read as a row (columns feature1...), and a repeated row counts once; the same label
    with other values is still refused, and a header of column numbers (pandas' 0..n-1) stays a
    header."""
    path = tmp_path / "emb.tsv"
    path.write_text("STAT1\t0.5\t-1\nIRF1\t2\t0.25\n")
    block = read_feature_tsv(path)
    assert block.labels == ["STAT1", "IRF1"] and block.columns == ["feature1", "feature2"]
    np.testing.assert_allclose(block.values, [[0.5, -1], [2, 0.25]])
    path.write_text("gene\te1\nSTAT1\t1\nIRF1\t2\nSTAT1\t1\n")
    block = read_feature_tsv(path)
    assert block.labels == ["STAT1", "IRF1"] and block.values.shape == (2, 1)
    path.write_text("gene\te1\nSTAT1\t1\nSTAT1\t2\n")
    with pytest.raises(ValueError, match=r"emb\.tsv: line 3: label 'STAT1' already given on line 2 with other"):
        read_feature_tsv(path)
    path.write_text("gene\t0\t1\nSTAT1\t0.5\t2\n")
    assert read_feature_tsv(path).columns == ["0", "1"]
    path.write_text("STAT1\t0.5\tNA\nIRF1\t2\t0.25\n")  # no header, a gap in the first row: named, not lost
    with pytest.raises(ValueError, match=r"emb\.tsv: line 1 \('STAT1'\), column 'feature2': 'NA' is not a number"):
        read_feature_tsv(path)


def test_a_smiles_header_that_names_another_smiles_column(tmp_path):
    """'drug,canonical_smiles' as a header was read as a drug named 'drug' (RDKit cannot parse
    'canonical_smiles', line 1). Now a first row whose second cell names SMILES is a header."""
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install 'scidiff[chem]')")
    path = tmp_path / "drugs.csv"
    path.write_text("drug,canonical_smiles,target\naspirin,CC(=O)Oc1ccccc1C(=O)O,COX\n")
    block = morgan_fingerprints(path)
    assert block.labels == ["aspirin"] and block.values.sum() > 0


def test_an_unseen_drug_named_twice_is_the_drug_once(dosed):
    """'dA+dA' (seen) is dA, but 'dNew+dNew' (unseen) took the prior's effect twice. Now a single
    named twice counts once, through the prior and through perturb."""
    model, _, control = dosed
    prior = model.perturbation_prior
    once, conf, _ = prior.predict("drug", "dNew")
    twice, conf2, _ = prior.predict("drug", "dNew+dNew")
    np.testing.assert_array_equal(twice, once)
    assert conf2 == conf
    one = _shifted(model, control, {"drug": "dNew", "dose": 10.0})
    two = _shifted(model, control, {"drug": "dNew+dNew", "dose": 10.0})
    np.testing.assert_array_equal(np.asarray(two.X), np.asarray(one.X))
    mixed = _shifted(model, control, {"drug": "dNew+dA+dNew", "dose": 10.0})
    np.testing.assert_allclose(np.asarray(mixed.X), np.asarray(_shifted(model, control, {"drug": "dA+dNew",
                                                                                       "dose": 10.0}).X), atol=1e-6)


def test_a_negative_or_nan_dose_is_refused_by_name(dosed, tmp_path, capsys):
    """A seen drug at dose NaN ended in "index 1 is out of bounds for axis 0 with size 1", and an
    unseen one at dose -1 or NaN took the prior's whole effect (a seen one at -1: no change). Now
    both are refused naming the dose, from Python and from scidiff predict (before any work)."""
    from scidiff.cli import main
    from scidiff.training import save_model

    model, _, control = dosed
    for drug in ("dA", "dNew"):
        for dose in (-1.0, float("nan")):
            with pytest.raises(ValueError, match=r"dose=(-1\.0|nan): a dose is a number >= 0"):
                _shifted(model, control, {"drug": drug, "dose": dose})
    run, data = tmp_path / "run", tmp_path / "control.h5ad"
    save_model(model, run)
    control.write_h5ad(data)
    assert main(["predict", "--model", str(run), "--data", str(data), "--target", "drug=dNew,dose=-1", "--out",
                 str(tmp_path / "no.h5ad")]) == 2
    assert "--target 'drug=dNew,dose=-1': dose=-1.0: a dose is a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "no.h5ad").exists()


def test_another_spelling_of_control_is_named_as_such(dosed):
    """GEARS' 'dNew+ctrl' on data whose control is 'control' was refused as "no prior knowledge of
    perturbation 'ctrl'" (and 'dA+ctrl' as a perturbation never seen). Now the error says 'ctrl'
    is not this model's control label and how to write the target."""
    model, _, control = dosed
    for label, write in (("dNew+ctrl", "dNew"), ("dA+ctrl", "dA"), ("ctrl", "control")):
        with pytest.raises(ValueError, match=rf"drug='{re.escape(label)}': 'ctrl' is not this model's control label "
                                             rf"\(it knows the control as 'control'\); write drug={write}$"):
            _shifted(model, control, {"drug": label, "dose": 10.0})


def test_a_time_or_dose_that_is_no_finite_number_is_refused(course, dosed):
    """perturb(..., {'day': nan}) moved the cells to the network's null time (no time in
    particular) and {'day': inf} decoded under an infinite time, where a trajectory refuses both;
    a dose of inf took the prior's effect. Now each is refused naming the key."""
    for (model, _, control), target in ((course, {"day": float("nan")}), (course, {"day": float("inf")}),
                                        (course, {"day": "nan"}),
                                        (dosed, {"drug": "dA", "dose": float("inf")}),
                                        (dosed, {"drug": "dNew", "dose": np.inf})):
        key = "day" if "day" in target else "dose"
        with pytest.raises(ValueError, match=f"{key}=.* is not a finite number; leave {key} out"):
            _shifted(model, control, target)


def test_an_unseen_drug_at_a_dose_takes_the_seen_drugs_dose_curve(tmp_path_factory):
    """Drugs measured at doses 1, 10 and 100 (their effects growing with the dose): an unseen drug
    took its effect pooled over doses at any dose > 0, the same at 1 as at 100. Now perturb scales
    it by the dose curve the seen drugs share (its fraction at each dose in the prior's report)."""
    model, _, control = _screen("dose", (1.0, 10.0, 100.0), tmp_path_factory)
    prior = model.perturbation_prior
    assert prior.report()["drug"]["dose"]["kind"] == "shared"
    low, high = prior.dose_scale("drug", np.array([1.0, 100.0]))
    assert 0 < low < 0.5 < 1 < high  # the effect at dose 1 is a fraction of the pooled one; at 100 above it
    effect = prior.predict("drug", "dNew")[0]  # log1p, pooled over doses
    for dose, scale in ((1.0, low), (100.0, high), (30.0, prior.dose_scale("drug", [30.0])[0])):
        out = _shifted(model, control, {"drug": "dNew", "dose": dose})
        x, c = np.asarray(out.X), np.asarray(out.layers["control"])
        np.testing.assert_allclose(x, np.maximum(c + scale * effect, 0), atol=1e-4)
