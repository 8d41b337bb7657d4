"""Perturbation prediction against a known ground truth, the metrics' closed forms, bad input."""
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.evaluation.perturbation import (LinearPerturbationModel, additive, e_distance, mean_shift,
                                             perturbation_metrics, scgen_r2)
from scidiff.tasks.perturb import predict_perturbation

G = 40
DOSE_EFFECT = lambda d: np.log1p(d) / np.log1p(100)  # noqa: E731


def _truth(rng, cap=None):
    """Mean expression per cell type, drugs and dose: additive responses, or with ``cap`` their sum
    saturated elementwise, ``cap * tanh(u / cap)``."""
    base = {t: rng.uniform(2.5, 4.0, G) for t in ("t0", "t1")}
    resp = {p: rng.normal(0, 1.0, G) * (rng.random(G) < 0.5) for p in "ABC"}

    def mean(t, drugs, dose):
        u = sum((DOSE_EFFECT(dose) * resp[p] for p in drugs), np.zeros(G))
        return base[t] + (u if cap is None else cap * np.tanh(u / cap))

    return mean


def _train_on(mean, rng):
    """Cells of ``mean``: singles A, B, C at doses 1 and 100, the combinations A+B and A+C at 100,
    in two cell types (B+C and dose 10 are never seen), and a model trained on them."""
    groups = [(t, "control", 0.0) for t in ("t0", "t1")]
    groups += [(t, p, d) for t in ("t0", "t1") for p in "ABC" for d in (1.0, 100.0)]
    groups += [(t, c, 100.0) for t in ("t0", "t1") for c in ("A+B", "A+C")]
    rows, xs = [], []
    for t, drug, dose in groups:
        m = mean(t, [] if drug == "control" else drug.split("+"), dose)
        xs.append(np.maximum(m + 0.15 * rng.normal(size=(150, G)), 0))
        rows += [(t, drug, dose)] * 150
    obs = pd.DataFrame(rows, columns=["cell_type", "drug", "dose"])
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.vstack(xs).astype(np.float32), obs=obs)
    adata.var_names = [f"g{i}" for i in range(G)]
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, condition_keys=["cell_type"], perturbation_keys=["drug"],
                                 dose_key="dose", scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=128, num_layers=3, num_timesteps=200)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           learning_rate=2e-3, warmup_steps=50).train(150)
    control = adata[(adata.obs["drug"] == "control") & (adata.obs["cell_type"] == "t0")].copy()
    return adata, mean, model, control


@pytest.fixture(scope="module")
def synthetic():
    """An additive response model with doses (see :func:`_train_on`)."""
    rng = np.random.default_rng(0)
    return _train_on(_truth(rng), rng)


@pytest.fixture(scope="module")
def saturating():
    """The same design with responses that saturate: ``tanh`` of their sum."""
    rng = np.random.default_rng(0)
    return _train_on(_truth(rng, cap=1.5), rng)


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def test_seen_perturbations_are_reproduced(synthetic):
    adata, mean, model, control = synthetic
    for drug in ("B", "A+B"):
        pred = predict_perturbation(model, control, {"drug": drug, "dose": 100.0}, steps=50, progress=False)
        assert pred.n_obs == control.n_obs and list(pred.obs_names) == list(control.obs_names)
        assert (pred.obs["drug"] == drug).all()
        np.testing.assert_allclose(pred.layers["control"], control.X, atol=1e-5)
        assert _rmse(pred.X.mean(0), mean("t0", drug.split("+"), 100.0)) < 0.08


def _additive_baseline(adata, control, drugs):
    """Mean of the control cells shifted by the real single deltas at dose 100 (cell type t0)."""
    sel = lambda drug: adata[(adata.obs["drug"] == drug) & (adata.obs["dose"] == 100) & (adata.obs["cell_type"] == "t0")].X  # noqa: E731
    return additive(control.X, [sel(p).mean(0) - control.X.mean(0) for p in drugs]).mean(0)


def test_unseen_combination_matches_the_additive_baseline(synthetic):
    adata, mean, model, control = synthetic
    truth = mean("t0", ["B", "C"], 100.0)
    baseline = _rmse(_additive_baseline(adata, control, ["B", "C"]), truth)
    for method in ("counterfactual", "population"):
        pred = predict_perturbation(model, control, {"drug": "C+B", "dose": 100.0}, method=method, progress=False)
        model_err = _rmse(pred.X.mean(0), truth)
        assert model_err < 1.25 * baseline + 0.01, (method, model_err, baseline)
    # a model that ignored the second perturbation would be far off
    assert _rmse(mean("t0", ["B"], 100.0), truth) > 5 * baseline


def test_unseen_saturating_combination_beats_the_additive_baseline(saturating):
    """The combination term fitted on A+B and A+C carries the saturation over to the unseen B+C,
    where the additive baseline is clearly wrong (measured: README, perturbation section)."""
    adata, mean, model, control = saturating
    truth = mean("t0", ["B", "C"], 100.0)
    baseline = _rmse(_additive_baseline(adata, control, ["B", "C"]), truth)
    seen = predict_perturbation(model, control, {"drug": "A+B", "dose": 100.0}, progress=False)
    assert baseline > 3 * _rmse(seen.X.mean(0), mean("t0", ["A", "B"], 100.0))
    for method in ("counterfactual", "population"):
        pred = predict_perturbation(model, control, {"drug": "B+C", "dose": 100.0}, method=method, progress=False)
        model_err = _rmse(pred.X.mean(0), truth)
        assert model_err < 0.75 * baseline, (method, model_err, baseline)


def test_a_perturbation_asked_for_without_its_dose(synthetic):
    """A target without a dose on a model that scales perturbations by one: the dose its groups
    were measured at, written into obs (A+B: 100 only); several doses are an error naming them
    (B: 1 and 100; B+C, never measured together: its singles')."""
    adata, mean, model, control = synthetic
    cells = control[:20].copy()
    implied = predict_perturbation(model, cells, {"drug": "A+B"}, steps=5, progress=False)
    given = predict_perturbation(model, cells, {"drug": "A+B", "dose": 100.0}, steps=5, progress=False)
    np.testing.assert_array_equal(implied.X, given.X)
    assert (implied.obs["dose"] == 100.0).all() and implied.uns["scidiff_prediction"]["target"]["dose"] == "100.0"
    for drug in ("B", "B+C", "B+C+control"):  # a control part names no dose (the controls' 0)
        with pytest.raises(ValueError, match=rf"drug={re.escape(drug)} was measured at dose \['1', '100'\]: give "
                                             rf"the dose to predict, e.g. drug={re.escape(drug)},dose=100"):
            predict_perturbation(model, cells, {"drug": drug}, steps=5, progress=False)


def test_unseen_dose_is_interpolated(synthetic):
    """A dose between the measured ones (10, between 1 and 100) takes the measured changes read
    linearly in log(1 + dose) (the truth here: exact), one below them (0.5) the line from no change
    at dose 0; the prediction is far nearer the truth than the nearest measured dose."""
    adata, mean, model, control = synthetic
    a = [model.data_spec.categorical["drug"].index("A")]
    t0 = [model.data_spec.categorical["cell_type"].index("t0")]
    at = {d: model.effects.seen_change("drug", a, t0, d) for d in (1.0, 100.0)}
    frac = (np.log1p(10) - np.log1p(1)) / (np.log1p(100) - np.log1p(1))
    torch.testing.assert_close(model.effects.seen_change("drug", a, t0, 10.0), at[1.0] + frac * (at[100.0] - at[1.0]))
    torch.testing.assert_close(model.effects.seen_change("drug", a, t0, 0.5), at[1.0] * np.log1p(0.5) / np.log1p(1))
    torch.testing.assert_close(model.effects.seen_change("drug", a, t0, 500.0), at[100.0])
    for dose, share in ((10.0, 0.1), (0.5, 0.4)):
        truth = mean("t0", ["A"], dose)
        pred = predict_perturbation(model, control, {"drug": "A", "dose": dose}, progress=False)
        nearest_seen = min(_rmse(mean("t0", ["A"], d), truth) for d in (1.0, 100.0))
        assert _rmse(pred.X.mean(0), truth) < share * nearest_seen, dose


def test_bad_input_at_predict_time(synthetic):
    adata, mean, model, control = synthetic
    with pytest.raises(ValueError, match=r"unknown perturbation: \['D'\].*known single perturbations: \['A', 'B', 'C'\]"):
        predict_perturbation(model, control, {"drug": "D"}, progress=False)
    with pytest.raises(ValueError, match=r"combination with an unseen single perturbation cannot be predicted: \['D'\]"):
        predict_perturbation(model, control, {"drug": "A+D"}, progress=False)
    with pytest.raises(ValueError, match=r"drug='a\+B': 'a' is not a label the model saw; it saw 'A' \(labels are "
                                         r"case-sensitive\)"):
        predict_perturbation(model, control, {"drug": "a+B"}, progress=False)
    with pytest.raises(ValueError, match=r"unknown value 't9' for condition 'cell_type'; known values: \['t0', 't1'\]"):
        predict_perturbation(model, control, {"drug": "A", "cell_type": "t9"}, progress=False)
    with pytest.warns(UserWarning, match=r"dose \[1000.0\] is outside the range seen in training \[0, 100\]"):
        predict_perturbation(model, control[:5], {"drug": "A", "dose": 1000.0}, steps=5, progress=False)
    mixed = adata[(adata.obs["cell_type"] == "t0") & adata.obs["drug"].isin(["control", "A"])].copy()
    with pytest.raises(ValueError, match=r"300 of the 450 input cells are perturbed in obs\['drug'\] \('A' \(300\)\); "
                                         r"predictions start from control cells"):
        predict_perturbation(model, mixed, {"drug": "B"}, progress=False)
    with pytest.raises(KeyError, match="g3"):
        predict_perturbation(model, control[:, [g for g in control.var_names if g != "g3"]].copy(), {"drug": "A"},
                             progress=False)
    other = control.copy()
    other.obs["cell_type"] = "t7"
    with pytest.raises(ValueError, match=r"obs\['cell_type'\] has values the model does not know: \['t7'\]"):
        predict_perturbation(model, other, {"drug": "A"}, progress=False)
    with pytest.raises(ValueError, match="target is empty"):
        predict_perturbation(model, control, {}, progress=False)


def test_labels_and_original_code_tensors_condition_alike(synthetic):
    adata, mean, model, control = synthetic
    spec = model.data_spec
    a = model.sample(8, {"drug": "B", "dose": 100.0, "cell_type": "t1"}, steps=10, seed=3)
    b = model.sample(batch_size=8, conditioning={"drug": torch.tensor([spec.categorical["drug"].index("B")]),
                                                 "dose": torch.tensor([100.0]),
                                                 "cell_type": torch.tensor([spec.categorical["cell_type"].index("t1")])},
                     steps=10, seed=3)
    torch.testing.assert_close(a, b)
    assert spec.decode_conditions(spec.encode_conditions({"drug": ["A+C", "control"]}, 2)) == {"drug": ["A+C", "control"]}


def test_separator_applies_only_to_perturbations():
    x = np.random.default_rng(0).poisson(3, (6, 5)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": ["CD14+Mono", "B"] * 3, "drug": ["A+B", "control", "A"] * 2})
    a = ad.AnnData(X=x, obs=obs)
    data = scidiff.setup_anndata(a, n_top_genes=None, condition_keys=["cell_type"], perturbation_keys=["drug"])
    assert sorted(data.spec.categorical["cell_type"]) == ["B", "CD14+Mono"]
    assert data.spec.categorical["drug"] == ["A", "B"]
    assert data.covariates["drug"].tolist()[:3] == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


# -- metrics and baselines ----------------------------------------------------------------------

def test_metric_closed_forms():
    rng = np.random.default_rng(1)
    genes = [f"g{i}" for i in range(50)]
    control = rng.normal(1.0, 0.2, (200, 50))
    delta = rng.normal(0, 1, 50)
    true = control + delta + rng.normal(0, 0.01, (200, 50))
    m = perturbation_metrics(true.copy(), true, control, genes, genes)
    assert m["scgen_r2_all"] == pytest.approx(1.0) and m["pearson_delta_all"] == pytest.approx(1.0)
    assert m["mse_top20"] == pytest.approx(0.0) and m["r2_top50"] == pytest.approx(1.0)
    half = perturbation_metrics(control + 0.5 * delta, true, control, genes, genes)
    assert half["pearson_delta_all"] == pytest.approx(1.0, abs=1e-3)  # scale-free
    assert half["mse_top20"] == pytest.approx(np.mean((0.5 * delta[:20]) ** 2), rel=0.05)
    assert scgen_r2(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1] ** 2)


def test_e_distance_closed_form():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(200, 4)) + np.array([1.0, 0, 0, 0])
    # with self-pairs excluded: 2 |mu_x - mu_y|^2 - 2 tr(S_x)/n_x - 2 tr(S_y)/n_y (S unbiased)
    dm = x.mean(0) - y.mean(0)
    expected = 2 * dm @ dm - 2 * np.trace(np.cov(x.T)) / 300 - 2 * np.trace(np.cov(y.T)) / 200
    assert e_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_baselines():
    control = np.ones((4, 3))
    d1, d2 = np.array([1.0, 0, -1]), np.array([0.0, 2, 0])
    np.testing.assert_allclose(mean_shift(control, [d1, d2]).mean(0), 1 + (d1 + d2) / 2)
    np.testing.assert_allclose(additive(control, [d1, d2])[0], 1 + d1 + d2)
    lin = LinearPerturbationModel(alpha=1e-8).fit(np.eye(2), np.stack([d1, d2]))
    np.testing.assert_allclose(lin.predict(control, np.array([1.0, 1.0]))[0], 1 + d1 + d2, atol=1e-6)


def test_cli_predict_on_real_data(tmp_path, kang_small):
    from scidiff.cli import main

    data = tmp_path / "kang.h5ad"
    kang_small.write_h5ad(data)
    control = tmp_path / "control.h5ad"
    kang_small[kang_small.obs["condition"] == "control"].copy().write_h5ad(control)
    config = tmp_path / "c.yaml"
    config.write_text("model: {gene_dim: 100, hidden_dim: 64, num_layers: 2, num_timesteps: 200, latent_dim: 16}\n"
                      "training: {batch_size: 64, warmup_steps: 5}\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--condition-keys", "cell_type", "--perturbation-keys", "condition",
                 "--out", str(run), "--config", str(config), "--epochs", "3"]) == 0
    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(control), "--target", "condition=stimulated",
                 "--steps", "5", "--out", str(out)]) == 0
    pred = ad.read_h5ad(out)
    ctrl = ad.read_h5ad(control)
    assert pred.n_obs == ctrl.n_obs and list(pred.obs_names) == list(ctrl.obs_names)
    assert (pred.obs["condition"] == "stimulated").all() and "control" in pred.layers
    assert main(["predict", "--model", str(run), "--data", str(control), "--target", "condition=heatshock",
                 "--out", str(tmp_path / "bad.h5ad")]) == 2
    assert not (tmp_path / "bad.h5ad").exists()
