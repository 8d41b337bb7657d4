"""The perturbation baselines against closed forms, the discrimination score against a hand
computation, the cell-eval adapter, and the data README's Zhao baselines on the real file."""
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scidiff.evaluation.perturbation import (additive, cell_mean, discrimination_score, interpolate_in_time,
                                             linear_in_time, mean_shift, no_change, pearson_delta,
                                             predict_baseline, rmse)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
G = 6


def _adata(groups):
    """``groups``: (context, perturbation, mean vector, n cells); cells = mean + fixed zero-mean noise."""
    rows, xs = [], []
    noise = np.array([[1.0], [-1.0]]) * np.linspace(0.1, 0.6, G)  # two cells per group, mean exactly zero
    for ctx, pert, mean, n in groups:
        xs.append(np.tile(mean + noise, (n // 2, 1)))
        rows += [(ctx, pert)] * n
    a = ad.AnnData(X=np.vstack(xs), obs=pd.DataFrame(rows, columns=["cell_type", "drug"],
                                                     index=[f"c{i}" for i in range(len(rows))]))
    a.var_names = [f"g{i}" for i in range(G)]
    return a


@pytest.fixture(scope="module")
def screen():
    rng = np.random.default_rng(0)
    base = {t: rng.uniform(2, 4, G) for t in ("t0", "t1", "t2")}
    eff = {p: rng.normal(0, 1, G) for p in "ABC"}
    groups = [(t, "control", base[t], 4) for t in base]
    groups += [(t, p, base[t] + eff[p] + (0.1 if t == "t1" else 0.0), 4) for t in ("t0", "t1") for p in "AB"]
    groups += [("t0", "C", base["t0"] + eff["C"], 4), ("t0", "A+C", base["t0"] + eff["A"] + eff["C"], 4)]
    train = _adata(groups)
    control = _adata([("t2", "control", base["t2"], 4)])
    return train, control, base, eff


def test_numpy_cores_closed_forms():
    control = np.ones((4, 3))
    d1, d2 = np.array([1.0, 0, -1]), np.array([0.0, 2, 0])
    np.testing.assert_array_equal(no_change(control), control)
    np.testing.assert_allclose(mean_shift(control, [d1, d2]), control + (d1 + d2) / 2)
    np.testing.assert_allclose(additive(control, [d1, d2]), control + d1 + d2)
    perturbed, reference = np.array([[3.0, 1, 0], [5, 3, 0]]), np.array([[1.0, 1, 1]])
    np.testing.assert_allclose(cell_mean(control, perturbed, reference), control + np.array([3.0, 1, -1]))


def test_baselines_over_anndata_closed_forms(screen):
    train, control, base, eff = screen
    kw = dict(perturbation_key="drug", context_key="cell_type", control_label="control")
    c = control.X
    nc = predict_baseline("no-change", train, control, {"drug": "A"}, **kw)
    np.testing.assert_array_equal(nc.X, c.astype(np.float32))
    assert list(nc.obs_names) == list(control.obs_names) and (nc.obs["drug"] == "A").all()
    np.testing.assert_allclose(nc.layers["control"], c)
    # mean shift: the mean of the per-context deltas, t0: eA, t1: eA + 0.1
    ms = predict_baseline("mean_shift", train, control, {"drug": "A"}, **kw).X
    np.testing.assert_allclose(ms, c + eff["A"] + 0.05, atol=1e-5)
    # additive: control + dA + dC, each a mean over the contexts holding it
    add = predict_baseline("additive", train, control, {"drug": "B+C"}, **kw).X
    np.testing.assert_allclose(add, c + (eff["B"] + 0.05) + eff["C"], atol=1e-5)
    # cell mean for an unseen drug: mean over contexts of (all perturbed cells - control)
    cm = predict_baseline("cell-mean", train, control, {"drug": "D"}, **kw).X
    t0 = np.mean([eff["A"], eff["B"], eff["C"], eff["A"] + eff["C"]], axis=0)
    t1 = np.mean([eff["A"], eff["B"]], axis=0) + 0.1
    np.testing.assert_allclose(cm, c + (t0 + t1) / 2, atol=1e-5)
    # the control itself is the control cells under every baseline
    for method in ("mean-shift", "additive", "cell-mean", "linear"):
        same = predict_baseline(method, train, control, {"drug": "control"}, **kw)
        np.testing.assert_array_equal(same.X, c.astype(np.float32))
        assert (same.obs["drug"] == "control").all()


def test_baselines_refuse_perturbed_input_cells(screen):
    """Baselines start from control cells, as the model does: input cells labelled with a
    perturbation (here 4 cells of A and 2 of A+C among 12) are refused, every method alike."""
    train, _, _, _ = screen
    obs = train.obs
    t0 = np.flatnonzero(np.isin(obs["drug"], ["control", "A"]) & (obs["cell_type"] == "t0").to_numpy())
    mixed = train[np.r_[t0, np.flatnonzero(obs["drug"] == "A+C")[:2]]].copy()
    assert dict(mixed.obs["drug"].value_counts()) == {"control": 4, "A": 4, "A+C": 2}
    for method in ("no-change", "mean-shift", "linear"):
        with pytest.raises(ValueError, match=r"6 of the 10 input cells are perturbed in obs\['drug'\] "
                                             r"\('A' \(4\), 'A\+C' \(2\)\); predictions start from control cells"):
            predict_baseline(method, train, mixed, {"drug": "B"}, perturbation_key="drug", context_key="cell_type",
                             control_label="control")


def test_linear_multi_hot_is_exact_on_additive_truth():
    rng = np.random.default_rng(1)
    base, eff = rng.uniform(2, 4, G), {p: rng.normal(0, 1, G) for p in "ABC"}
    groups = [("t0", "control", base, 2)] + [("t0", p, base + eff[p], 2) for p in "ABC"]
    groups.append(("t0", "A+B", base + eff["A"] + eff["B"], 2))
    train, control = _adata(groups), _adata([("t0", "control", base, 2)])
    pred = predict_baseline("linear", train, control, {"drug": "B+C"}, perturbation_key="drug", alpha=1e-9).X
    np.testing.assert_allclose(pred.mean(0), base + eff["B"] + eff["C"], atol=1e-5)
    with pytest.raises(ValueError, match=r"single perturbations unseen in train: \['D'\]"):
        predict_baseline("linear", train, control, {"drug": "A+D"}, perturbation_key="drug")
    with pytest.raises(ValueError, match="mean-shift: 'D' has no training cells"):
        predict_baseline("mean-shift", train, control, {"drug": "D"}, perturbation_key="drug")
    with pytest.raises(ValueError, match="unknown baseline 'median'"):
        predict_baseline("median", train, control, {"drug": "A"}, perturbation_key="drug")


def _replicated_screen(effect_scale: float, seed: int = 3):
    """Four drugs, each measured in three contexts: delta = effect_scale * effect + N(0, 0.3) per
    (context, drug) group; returns (train, control, the groups' deltas keyed (context, drug))."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(2, 4, G)
    eff = {p: effect_scale * rng.normal(0, 1, G) for p in "ABCD"}
    deltas = {(t, p): eff[p] + rng.normal(0, 0.3, G) for t in ("t0", "t1", "t2") for p in "ABCD"}
    groups = [(t, "control", base, 2) for t in ("t0", "t1", "t2")]
    groups += [(t, p, base + d, 2) for (t, p), d in deltas.items()]
    return _adata(groups), _adata([("t3", "control", base, 2)]), deltas


@pytest.mark.parametrize("effect_scale", [1.0, 0.0])
def test_linear_penalty_is_chosen_by_leave_one_group_out(effect_scale):
    """The linear baseline's ridge penalty is chosen by leave-one-group-out cross-validation (each
    (context, drug) group's delta predicted from the other groups), as a brute-force loop over the
    same penalties chooses it: little shrinkage where the drugs' effects repeat across contexts,
    much where every group is noise around no effect (a screen where nothing happens)."""
    from sklearn.linear_model import Ridge

    from scidiff.evaluation.perturbation import RIDGE_ALPHAS

    train, control, deltas = _replicated_screen(effect_scale)
    keys = list(deltas)
    X = np.array([[float(p == q) for q in "ABCD"] for _, p in keys])
    Y = np.stack([deltas[k] for k in keys])
    cv = [sum(float(np.sum((Ridge(alpha=a, fit_intercept=False).fit(np.delete(X, i, 0), np.delete(Y, i, 0))
                            .predict(X[i:i + 1])[0] - Y[i]) ** 2)) for i in range(len(keys))) for a in RIDGE_ALPHAS]
    best = RIDGE_ALPHAS[int(np.argmin(cv))]
    kw = dict(perturbation_key="drug", context_key="cell_type", control_label="control")
    pred = predict_baseline("linear", train, control, {"drug": "B"}, **kw)
    assert pred.uns["baseline"]["alpha"] == pytest.approx(best, rel=1e-12)
    expected = Ridge(alpha=best, fit_intercept=False).fit(X, Y).predict(np.array([[0.0, 1, 0, 0]]))[0]
    np.testing.assert_allclose(pred.X, control.X + expected, atol=1e-5)
    change = np.linalg.norm(expected)
    mean_change = np.linalg.norm(np.mean([deltas[(t, "B")] for t in ("t0", "t1", "t2")], axis=0))
    if effect_scale:  # the effects repeat: the mean over contexts nearly unshrunk
        assert best <= 0.1 and change > 0.95 * mean_change
    else:  # nothing happens: the baseline says so
        assert best >= 10 and change < 0.3 * mean_change
    fixed = predict_baseline("linear", train, control, {"drug": "B"}, alpha=1.0, **kw)
    assert fixed.uns["baseline"]["alpha"] == 1.0
    np.testing.assert_allclose(fixed.X, control.X + Ridge(alpha=1.0, fit_intercept=False).fit(X, Y).predict(
        np.array([[0.0, 1, 0, 0]]))[0], atol=1e-5)


def test_linear_penalty_on_features_leaves_out_each_perturbation():
    """With features for perturbations never seen (gene embeddings), the penalty is chosen leaving
    out each perturbation's rows at once, as a brute-force loop over the same penalties does: its
    rows in other contexts would otherwise vouch for a fit that reads them, not the features (here
    each perturbation's two rows share an effect the features do not explain, and leaving out one
    row at a time picks a far smaller penalty)."""
    from sklearn.linear_model import Ridge, RidgeCV

    from scidiff.evaluation.perturbation import RIDGE_ALPHAS, LinearPerturbationModel

    rng = np.random.default_rng(5)
    n_labels, k, genes = 12, 6, 20
    feats = rng.normal(size=(n_labels, k))
    W = 0.3 * rng.normal(size=(k, genes))
    own = rng.normal(size=(n_labels, genes))  # each perturbation's effect beyond its features
    labels = np.repeat([f"P{i}" for i in range(n_labels)], 2)
    X = feats[np.repeat(np.arange(n_labels), 2)]
    Y = X @ W + own[np.repeat(np.arange(n_labels), 2)] + 0.05 * rng.normal(size=(2 * n_labels, genes))
    errors = []
    for a in RIDGE_ALPHAS:
        err = 0.0
        for lab in np.unique(labels):
            out = labels == lab
            fit = Ridge(alpha=a, fit_intercept=False).fit(X[~out], Y[~out])
            err += float(np.sum((fit.predict(X[out]) - Y[out]) ** 2))
        errors.append(err)
    best = RIDGE_ALPHAS[int(np.argmin(errors))]
    model = LinearPerturbationModel().fit(X, Y, groups=labels)
    assert model.alpha_ == pytest.approx(best, rel=1e-12)
    np.testing.assert_allclose(model.predict_delta(feats[0]),
                               Ridge(alpha=best, fit_intercept=False).fit(X, Y).predict(feats[:1])[0], atol=1e-10)
    by_row = RidgeCV(alphas=RIDGE_ALPHAS, fit_intercept=False).fit(X, Y).alpha_
    assert LinearPerturbationModel().fit(X, Y).alpha_ == pytest.approx(by_row, rel=1e-12)
    assert best >= 10 * by_row


def test_linear_in_time_is_exact_on_a_linear_truth():
    a, b = np.linspace(1, 2, G), np.linspace(-0.3, 0.2, G)  # mean(t) = a + b t
    times = [0.0, 2.0, 7.0]
    means = np.stack([a + b * t for t in times])
    np.testing.assert_allclose(interpolate_in_time(times, means, 4.0), a + 4 * b)
    control = np.tile(a + 2 * b, (3, 1)) + np.array([[0.1], [0.0], [-0.1]])
    np.testing.assert_allclose(linear_in_time(control, times, means, 4.0).mean(0), a + 4 * b)
    with pytest.raises(ValueError, match="outside the measured times"):
        interpolate_in_time(times, means, 9.0)
    # over AnnData: the day column, the day-2 cells as control
    obs = pd.DataFrame({"day": np.repeat(times, 2)}, index=[f"c{i}" for i in range(6)])
    train = ad.AnnData(X=np.repeat(means, 2, axis=0) + np.tile([[0.05], [-0.05]], (3, 1)), obs=obs)
    ctrl = train[train.obs["day"] == 2.0].copy()
    pred = predict_baseline("linear", train, ctrl, {"day": 4.0}, time_key="day")
    np.testing.assert_allclose(pred.X.mean(0), a + 4 * b, atol=1e-6)


def test_discrimination_score_by_hand():
    real = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    pred = np.array([[0.9, 0.0],   # L1 to real: 0.9, 0.1, 2.9 -> true (0) ranks 2nd of 3: 1 - 1/3
                     [1.0, 0.0],   # nearest is itself: 1
                     [0.0, 0.0]])  # L1: 0, 1, 2 -> true (2) ranks last: 1 - 2/3
    np.testing.assert_allclose(discrimination_score(pred, real), [2 / 3, 1.0, 1 / 3])
    # leaving out gene 1 for the third prediction: L1 on gene 0 only: 0, 1, 0 -> argsort [0, 2, 1], rank 1
    np.testing.assert_allclose(discrimination_score(pred, real, exclude=[None, None, [1]]), [2 / 3, 1.0, 2 / 3])
    # predictions for a subset, ranked among all real effects
    np.testing.assert_allclose(discrimination_score(pred[1:2], real, true_index=[1]), [1.0])


def test_metrics_closed_forms():
    t, c = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    assert rmse(t + 0.5, t) == pytest.approx(0.5)
    assert pearson_delta(c + 2 * (t - c), t, c) == pytest.approx(1.0)


def _ce_example(rng):
    """3 perturbations (each moving 3 of 20 genes) and control, log1p-like, 40 cells each."""
    genes = [f"g{i}" for i in range(20)]
    base = rng.uniform(1.0, 3.0, 20)
    eff = {p: np.zeros(20) for p in ("P1", "P2", "P3")}
    for i, p in enumerate(eff):
        eff[p][3 * i:3 * i + 3] = [1.5, -0.8, 1.0]
    blocks, labels = [], []
    for p, e in [("control", np.zeros(20))] + list(eff.items()):
        blocks.append(np.maximum(base + e + rng.normal(0, 0.3, (40, 20)), 0))
        labels += [p] * 40
    real = ad.AnnData(X=np.vstack(blocks).astype(np.float32), obs=pd.DataFrame({"perturbation": labels},
                      index=[f"c{i}" for i in range(len(labels))]))
    real.var_names = genes
    return real, eff


def test_cell_eval_adapter():
    pytest.importorskip("cell_eval", reason="cell-eval is not installed (pip install 'scidiff[celleval]')")
    from scidiff.evaluation.cell_eval import cell_eval_score, run_cell_eval

    rng = np.random.default_rng(0)
    real, _ = _ce_example(rng)
    # a good prediction: fresh cells of the same groups; a bad one: the control cells for every group
    good = real.copy()
    good.X = np.maximum(good.X + rng.normal(0, 0.05, good.shape), 0).astype(np.float32)
    ctrl = real[real.obs["perturbation"] == "control"].X
    bad = real.copy()
    bad.X = np.vstack([ctrl] * 4)
    r_good = run_cell_eval(good, real, "perturbation", "control", min_de_genes=3)
    r_bad = run_cell_eval(bad, real, "perturbation", "control", min_de_genes=3)
    assert sorted(r_good.per_perturbation) == ["P1", "P2", "P3"]
    assert r_good.mean["pearson_delta"] > 0.95 and r_good.mean["discrimination_score_l1"] == 1.0
    assert r_good.mean["mae"] < 0.1 < r_bad.mean["mae"]
    assert r_good.mean["de_nsig_counts_real"] == 3 and r_good.mean["overlap_at_N"] == 1.0
    # with fewer significant real DE genes than min_de_genes the overlap is not reported
    assert np.isnan(run_cell_eval(good, real, "perturbation", "control").mean["overlap_at_N"])
    # the adapter's discrimination score is cell-eval's, which ours reproduces on the group means
    means = lambda a, p: np.asarray(a[a.obs["perturbation"] == p].X).mean(0)  # noqa: E731
    perts = ["P1", "P2", "P3"]
    ours = discrimination_score(np.stack([means(good, p) - means(good, "control") for p in perts]),
                                np.stack([means(real, p) - means(real, "control") for p in perts]))
    np.testing.assert_allclose(ours, [r_good.per_perturbation[p]["discrimination_score_l1"] for p in perts])
    score = cell_eval_score(r_good, r_bad)  # cell-eval's normalisation against the baseline's means
    assert score["mae"] == pytest.approx(1 - r_good.mean["mae"] / r_bad.mean["mae"])
    assert score["discrimination_score_l1"] == pytest.approx(1.0) and score["overlap_at_N"] == pytest.approx(1.0)
    assert score["avg_score"] > 0.7
    assert cell_eval_score(r_bad, r_bad)["avg_score"] == 0.0
    # one perturbation: no discrimination score (it would be 1 by construction)
    one = real[real.obs["perturbation"].isin(["control", "P1"])].copy()
    assert "discrimination_score_l1" not in run_cell_eval(one, one, "perturbation", "control").mean


def test_cell_eval_missing_says_how_to_install(monkeypatch):
    import sys

    from scidiff.evaluation import cell_eval as adapter

    monkeypatch.setitem(sys.modules, "cell_eval", None)
    real, _ = _ce_example(np.random.default_rng(0))
    with pytest.raises(ImportError, match=r"pip install 'scidiff\[celleval\]'"):
        adapter.run_cell_eval(real, real, "perturbation", "control")


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "zhao21_glioblastoma_panobinostat_lemur.h5ad")),
                    reason="needs ../shared/data (zhao21_glioblastoma_panobinostat_lemur.h5ad) beside the project")
def test_zhao_baselines_reproduce_the_data_readme():
    """Data README: no change RMSE 0.589, mean shift 0.562 (normalize_total 1e4 + log1p, all genes, 5 folds)."""
    import scanpy as sc

    a = ad.read_h5ad(os.path.join(DATA, "zhao21_glioblastoma_panobinostat_lemur.h5ad"))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a.X = a.X.toarray()
    pt, cond = a.obs["patient_id"].astype(str).to_numpy(), a.obs["condition"].astype(str).to_numpy()
    err = {"no-change": [], "mean-shift": []}
    for p in sorted(set(pt)):
        train = a[~((pt == p) & (cond == "panobinostat"))]
        control, true = a[(pt == p) & (cond == "ctrl")], a[(pt == p) & (cond == "panobinostat")].X.mean(0)
        for m in err:
            pred = predict_baseline(m, train, control, {"condition": "panobinostat"}, perturbation_key="condition",
                                    context_key="patient_id", control_label="ctrl")
            err[m].append(rmse(pred.X.mean(0), true))
    assert np.mean(err["no-change"]) == pytest.approx(0.589, abs=0.005)
    assert np.mean(err["mean-shift"]) == pytest.approx(0.562, abs=0.005)


def test_linear_on_gene_pca_predicts_an_unseen_knockout_as_the_reference_ridge(tmp_path, capsys):
    """``scidiff predict --method linear --linear-features gene-pca`` (Ahlmann-Eltze et al. 2025):
    an unseen knockout's change is ridge (alpha 1, no intercept) from the seen knockouts' target-gene
    loadings on the training cells' top 10 principal components to their mean changes, evaluated at
    its own gene's loadings; computed here with scikit-learn from scratch. The training file may
    name its genes by ID with symbols in var, the cells by symbol."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    from scidiff.cli import main

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(30)]
    labels = np.repeat(["ctrl"] + genes[:12], 40)
    x = np.abs(1.5 + 0.4 * rng.normal(size=(len(labels), 30)))
    for j in range(12):
        rows = labels == genes[j]
        x[rows, j] *= 0.3
        x[rows, (j + 5) % 30] += 0.5
    obs = pd.DataFrame({"pert": labels}, index=[f"c{i}" for i in range(len(x))])
    train = ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    control = train[train.obs["pert"] == "ctrl"][:25].copy()
    train.write_h5ad(tmp_path / "train.h5ad")
    control.write_h5ad(tmp_path / "control.h5ad")
    by_id = train.copy()
    by_id.var = pd.DataFrame({"gene_name": genes}, index=[f"ENSG{i:011d}" for i in range(30)])
    by_id.write_h5ad(tmp_path / "train_ids.h5ad")

    xt = train.X.astype(np.float64)
    loadings = PCA(n_components=10, svd_solver="full", random_state=0).fit(xt).components_.T
    seen = genes[:12]
    deltas = np.stack([xt[labels == g].mean(0) - xt[labels == "ctrl"].mean(0) for g in seen])
    ridge = Ridge(alpha=1.0, fit_intercept=False).fit(loadings[:12], deltas)
    expected = control.X + ridge.predict(loadings[[20]])[0]
    for name in ("train.h5ad", "train_ids.h5ad"):
        out = tmp_path / f"linear_{name}"
        assert main(["predict", "--method", "linear", "--linear-features", "gene-pca", "--train", str(tmp_path / name),
                     "--data", str(tmp_path / "control.h5ad"), "--perturbation-key", "pert", "--control-labels", "ctrl",
                     "--target", "pert=G20", "--linear-alpha", "1", "--out", str(out)]) == 0
        pred = ad.read_h5ad(out)
        np.testing.assert_allclose(pred.X, expected, rtol=0, atol=1e-5)
        assert pred.uns["scidiff_prediction"]["baseline"]["alpha"] == 1.0
    for target, message in (("G3+G20", "predicts single gene targets"), ("NOTAGENE", "name no gene of --train")):
        capsys.readouterr()
        assert main(["predict", "--method", "linear", "--linear-features", "gene-pca", "--train",
                     str(tmp_path / "train.h5ad"), "--data", str(tmp_path / "control.h5ad"), "--perturbation-key",
                     "pert", "--control-labels", "ctrl", "--target", f"pert={target}", "--out",
                     str(tmp_path / "x.h5ad")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()


def test_baselines_read_paths_and_refuse_a_target_given_as_text(screen, tmp_path):
    """A notebook user passing file paths got "'str' object has no attribute 'var_names'", and a
    target written as text ("A") failed letter by letter ("dictionary update sequence element")."""
    train, control, _, _ = screen
    kw = dict(perturbation_key="drug", context_key="cell_type", control_label="control")
    train.write_h5ad(tmp_path / "train.h5ad")
    control.write_h5ad(tmp_path / "control.h5ad")
    from_files = predict_baseline("mean-shift", str(tmp_path / "train.h5ad"), tmp_path / "control.h5ad",
                                  {"drug": "A"}, **kw)
    np.testing.assert_array_equal(from_files.X, predict_baseline("mean-shift", train, control, {"drug": "A"}, **kw).X)
    with pytest.raises(ValueError, match=r"target must be a dict of covariate -> label .*, got 'A'"):
        predict_baseline("mean-shift", train, control, "A", **kw)
