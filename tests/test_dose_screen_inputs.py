"""A sci-Plex-shaped drug screen as a computational biologist runs it: three cell lines, drugs
named after sci-Plex's (their SMILES from the shared list) at 10, 100, 1,000 and 10,000 nM, each
effect growing with the dose along a Hill curve, 'Vehicle' controls at dose 0; one drug never
measured (the prior's). The model's predictions are checked against the truth of the data, and the
baselines at a dose against the cells measured at that dose. Tiny synthetic data and model; each
fix reproduced first (the test failed before it)."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch

import scidiff
from scidiff.models.perturbation_prior import PerturbationPrior
from scidiff.tasks.screen import baseline_screen
from shared_data import shared_file
from test_predict_screen import single_thread

pytest.importorskip("rdkit")

GENES = 40
LINES = ["A549", "K562", "MCF7"]
DRUGS = ["Belinostat", "Pracinostat", "Givinostat", "Alvespimycin", "Dasatinib", "Flavopiridol"]
UNSEEN = "Trametinib"
DOSES = [10.0, 100.0, 1000.0, 10000.0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """``(model, log1p AnnData of every cell, control cells)``: 60 Vehicle cells and 20 cells per
    drug and dose in each line, Poisson counts whose log-rate moves by ``dose / (dose + IC50)``
    times the drug's effect (a shared response plus its own); a tiny model trained two epochs with
    its prior from the drugs' SMILES."""
    table = pd.read_csv(shared_file("sciplex_drugs_smiles.csv"), header=None)
    smiles = tmp_path_factory.mktemp("dose") / "smiles.csv"
    table[[0, 1]].to_csv(smiles, header=False, index=False)
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.6, GENES)  # a stress response every drug shares: what the prior can learn
    effect = {d: shared + rng.normal(0, 0.6, GENES) * (rng.random(GENES) < 0.4) for d in DRUGS + [UNSEEN]}
    ic50 = {d: 10 ** rng.uniform(1.5, 3.0) for d in DRUGS + [UNSEEN]}
    xs, obs = [], []
    for line in LINES:
        base = rng.uniform(2, 15, GENES)
        xs.append(rng.poisson(base, (60, GENES)))
        obs += [(line, "Vehicle", 0.0)] * 60
        for drug in DRUGS:
            for dose in DOSES:
                xs.append(rng.poisson(base * np.exp(dose / (dose + ic50[drug]) * effect[drug]), (20, GENES)))
                obs += [(line, drug, dose)] * 20
    a = ad.AnnData(np.vstack(xs).astype(np.float32), obs=pd.DataFrame(obs, columns=["cell_line", "drug", "dose"]))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(GENES)]
    cells = scidiff.setup_anndata(a, n_top_genes=None, condition_keys=["cell_line"], perturbation_keys=["drug"],
                                  dose_key="dose", control_labels=["Vehicle"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(cells, hidden_dim=32, num_layers=1, num_timesteps=20, conditioning_dim=8,
                                           latent_dim=8)
    scidiff.ScIDiffTrainer(model, cells.loader(256, seed=0), device="cpu", progress=False,
                           early_stopping_patience=None, seed=0).train(2)
    model.perturbation_prior = PerturbationPrior.from_cells(cells, a, smiles=str(smiles))
    log = a.copy()
    sc.pp.normalize_total(log, target_sum=float(model.data_spec.target_sum))
    sc.pp.log1p(log)
    return model, log, a[(a.obs["drug"] == "Vehicle").to_numpy()].copy()


def _real_change(log, line, drug, dose):
    obs = log.obs
    x = np.asarray(log.X)
    group = (obs["cell_line"] == line).to_numpy() & (obs["drug"] == drug).to_numpy() & (obs["dose"] == dose).to_numpy()
    control = (obs["cell_line"] == line).to_numpy() & (obs["drug"] == "Vehicle").to_numpy()
    return x[group].mean(0) - x[control].mean(0)


def _changes(pred, key="cell_line"):
    x, c = np.asarray(pred.X), np.asarray(pred.layers["control"])
    return {v: x[(pred.obs[key] == v).to_numpy()].mean(0) - c[(pred.obs[key] == v).to_numpy()].mean(0)
            for v in LINES}


def test_a_baseline_reads_the_cells_measured_at_the_dose_asked_for(screen):
    """`scidiff predict --method mean-shift --target drug=Belinostat,dose=10` (and additive, linear,
    cell-mean) pooled Belinostat's cells over its four doses: 10 nM and 10 uM were the same
    prediction, the dose written into obs as text ('10') it was never read at. Now each reads the
    cells measured at the dose asked for (the mean shift at 10 nM is the lines' mean change at 10
    nM exactly), the dose is a number in obs, and a dose nothing was measured at is refused,
    naming the measured ones."""
    _, log, _ = screen
    control = log[(log.obs["drug"] == "Vehicle").to_numpy()].copy()
    kw = dict(perturbation_key="drug", context_key="cell_line", control_labels=["Vehicle"])
    targets = [{"drug": "Belinostat", "dose": "10"}, {"drug": "Belinostat", "dose": 1e4}]
    pred = baseline_screen("mean-shift", log, control, targets, **kw)
    assert pred.obs["dose"].dtype == float and set(pred.obs["dose"]) == {10.0, 10000.0}
    for i, dose in enumerate([10.0, 10000.0]):
        part = pred[(pred.obs["scidiff_target"].astype(str).str.endswith(str(targets[i]["dose"]))).to_numpy()]
        truth = np.mean([_real_change(log, line, "Belinostat", dose) for line in LINES], axis=0)
        for change in _changes(part).values():
            np.testing.assert_allclose(change, truth, atol=1e-4)
    for method in ["additive", "linear", "cell-mean"]:
        low, high = (np.asarray(baseline_screen(method, log, control, [t], **kw).X).mean(0) for t in targets)
        assert np.abs(high - low).max() > 0.1, method
    with pytest.raises(ValueError, match=r"dose=300 \(dose measured: 10, 100, 1000, 10000\)"):
        baseline_screen("mean-shift", log, control, [{"drug": "Belinostat", "dose": 300}], **kw)


def test_a_seen_drug_follows_its_measured_dose_response(screen):
    """A seen drug at a measured dose moves the lines by their groups' real mean change (pooled
    over the lines, whose truth is one effect; within the shrinkage the seen route applies); a
    higher dose of the Hill-shaped drug moves cells further; the dose as text, in exponent notation
    or as a numpy float is the same prediction."""
    model, log, control = screen
    sizes = []
    for dose in DOSES:
        pred = scidiff.perturb(model, control, {"drug": "Belinostat", "dose": dose}, steps=3, progress=False,
                               observed=False)
        assert set(pred.obs["scidiff_route"]) == {"seen"} and (pred.obs["dose"] == dose).all()
        change = np.mean(list(_changes(pred).values()), axis=0)
        truth = np.mean([_real_change(log, line, "Belinostat", dose) for line in LINES], axis=0)
        if np.linalg.norm(truth) > 1.5:  # above the noise of 20 cells a group
            assert np.corrcoef(change, truth)[0, 1] > 0.95, dose
            assert np.linalg.norm(change - truth) < 0.25 * np.linalg.norm(truth), dose
        sizes.append(np.linalg.norm(change))
    assert np.all(np.diff(sizes) > 0), sizes
    same = [np.asarray(scidiff.perturb(model, control, {"drug": "Belinostat", "dose": d}, steps=3, progress=False,
                                       observed=False).X) for d in ["100", "1e2", np.float32(100)]]
    for x in same[1:]:
        np.testing.assert_allclose(x, same[0], atol=1e-6)


def test_an_unseen_drug_follows_the_shared_dose_curve(screen):
    """An unseen drug from its SMILES changes nothing at dose 0, more at 10 uM than at 10 nM (the
    dose curve the seen drugs share), and a dose far beyond the measured ones is flagged."""
    model, _, control = screen
    sizes = []
    for dose in [0.0, 10.0, 10000.0]:
        pred = scidiff.perturb(model, control, {"drug": UNSEEN, "dose": dose}, steps=3, progress=False,
                               observed=False)
        assert set(pred.obs["scidiff_route"]) == {"prior"}
        sizes.append(np.linalg.norm(np.asarray(pred.X - pred.layers["control"]).mean(0)))
    assert sizes[0] < 1e-5 < sizes[1] < sizes[2], sizes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scidiff.perturb(model, control[:5], {"drug": UNSEEN, "dose": 1e6}, steps=3, progress=False, observed=False)
    assert any("outside the range seen in training" in str(w.message) for w in caught)


def test_a_seen_drugs_confidence_is_that_of_the_dose_asked_for(screen):
    """A seen drug's confidence counted its cells over all four doses (80 a line: 0.727) whatever the
    dose asked for: 10 uM, measured, as 10 mM, a thousand times beyond the highest dose measured (the
    change extrapolated, flagged only by a warning the screen's file does not keep), and dose 0,
    where nothing changes. Now it is the group at that dose (20 cells: 0.4), none beyond the highest
    dose measured (as the ``direct`` route's), and 1 at dose 0."""
    model, _, control = screen
    for dose, expected in [(10000.0, 20 / 50), (3000.0, 20 / 50), (1e7, 0.0), (0.0, 1.0)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 1e7: outside the range seen in training
            pred = scidiff.perturb(model, control, {"drug": "Belinostat", "dose": dose}, steps=3, progress=False,
                                   observed=False)
        np.testing.assert_allclose(pred.obs["scidiff_confidence"], expected, atol=1e-6, err_msg=str(dose))


def test_a_drug_the_smiles_list_lacks_is_refused_naming_that_list(screen):
    """A drug missing from the --smiles list was refused with 'a row of a --perturbation-features
    TSV (given at training: smiles.csv)': the SMILES list named as the TSV, no file beside the
    flag it came with. Now each file is named beside its own flag."""
    model, _, control = screen
    with pytest.raises(ValueError, match=r"'Vorinostat'.*--perturbation-features TSV; or as a drug of a --smiles "
                                         r"CSV \(name,smiles\) \(given at training: .*smiles\.csv\)"):
        scidiff.perturb(model, control[:3], {"drug": "Vorinostat", "dose": 100}, steps=3, progress=False)


def test_the_python_baseline_reads_the_dose_and_the_vehicle_has_none(screen, tmp_path, capsys):
    """predict_baseline from Python pooled Belinostat's doses (the 10 nM and 10 uM mean shifts were
    one prediction; only scidiff predict cut the cells at the dose); the vehicle asked for at 100 nM
    came back as the control cells labelled 100 nM, from the model and from every baseline. Now
    the Python baseline is the change measured at the dose asked for, and the vehicle at a dose its
    cells were not measured at is refused, naming their dose (at 0 it is the control cells); a
    dose beyond the measured ones is said once by scidiff predict (it was said twice)."""
    from scidiff.cli import main
    from scidiff.evaluation.perturbation import predict_baseline
    from scidiff.training import save_model

    model, log, control = screen
    vehicle = log[(log.obs["drug"] == "Vehicle").to_numpy()].copy()
    kw = dict(perturbation_key="drug", context_key="cell_line", control_label="Vehicle")
    for dose in DOSES[::3]:
        pred = predict_baseline("mean-shift", log, vehicle, {"drug": "Belinostat", "dose": dose}, **kw)
        truth = np.mean([_real_change(log, line, "Belinostat", dose) for line in LINES], axis=0)
        for change in _changes(pred).values():
            np.testing.assert_allclose(change, truth, atol=1e-4)
        assert pred.uns["baseline"]["at"] == {"dose": dose}
    said = r"drug='Vehicle' is the control, whose training cells were measured at dose 0 only, not 100"
    with pytest.raises(ValueError, match=said):
        predict_baseline("mean-shift", log, vehicle, {"drug": "Vehicle", "dose": 100}, **kw)
    with pytest.raises(ValueError, match=said):
        scidiff.perturb(model, control, {"drug": "Vehicle", "dose": 100}, steps=3, progress=False, observed=False)
    for pred in (predict_baseline("additive", log, vehicle, {"drug": "Vehicle", "dose": 0}, **kw),
                 scidiff.perturb(model, control, {"drug": "Vehicle", "dose": 0}, steps=3, progress=False,
                                 observed=False)):
        np.testing.assert_array_equal(np.asarray(pred.X), np.asarray(pred.layers["control"]))
    run, data = tmp_path / "run", tmp_path / "control.h5ad"
    save_model(model, run)
    control.write_h5ad(data)
    assert main(["predict", "--model", str(run), "--data", str(data), "--target", "drug=Vehicle,dose=100", "--out",
                 str(tmp_path / "no.h5ad")]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "no.h5ad").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", "--model", str(run), "--data", str(data), "--target", "drug=Belinostat,dose=1e6",
                     "--steps", "3", "--out", str(tmp_path / "far.h5ad")]) == 0
    beyond = [w for w in caught if "outside the range seen in training" in str(w.message)]
    assert len(beyond) == 1, [str(w.message) for w in caught]
