"""``scidiff evaluate`` on the inputs a first-time user brings: a generated file normalised to
another library size than 10,000, a prediction in counts, numeric group labels spelt ``1`` in one
file and ``1.0`` in the other, NaN metrics (metrics.json stays strict JSON), one-cell groups,
one gene, and a perturbation flag given without ``--perturbation``. Small synthetic AnnData."""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scidiff.cli import main
from scidiff.evaluation import mmd_rbf
from scidiff.evaluation.plots import report_plots
from scidiff.tasks.evaluate import evaluate_files, evaluate_perturbation

GENES = [f"G{i}" for i in range(12)]


def _counts(n, seed=0, boost=None):
    rng = np.random.default_rng(seed)
    lam = np.linspace(1, 8, len(GENES))
    if boost is not None:
        lam = lam.copy()
        lam[boost] *= 5
    return rng.poisson(lam, size=(n, len(GENES))).astype(np.float32) + 1  # every cell has counts


def _adata(x, prefix, **obs):
    a = ad.AnnData(X=np.asarray(x, np.float32), obs=pd.DataFrame(obs, index=[f"{prefix}{i}" for i in range(len(x))]))
    a.var_names = GENES
    return a


def _log(counts, target):
    return np.log1p(counts / counts.sum(1, keepdims=True) * target).astype(np.float32)


def _strict(text):
    def refuse(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=refuse)


def test_real_counts_are_normalised_to_the_generated_files_target_sum(tmp_path, capsys):
    counts = _counts(40)
    real = _adata(counts, "r")
    gen = _adata(_log(counts, 1000.0), "g")  # the same cells, as a model trained at target_sum 1000 writes them
    gen.uns["scidiff"] = {"expression": "log1p-normalised (target_sum 1000), smooth"}
    real.write_h5ad(tmp_path / "real.h5ad")
    gen.write_h5ad(tmp_path / "gen.h5ad")
    assert main(["evaluate", "--real", str(tmp_path / "real.h5ad"), "--generated", str(tmp_path / "gen.h5ad"),
                 "--no-plots", "--out", str(tmp_path / "report")]) == 0
    m = _strict((tmp_path / "report" / "metrics.json").read_text())
    assert m["inputs"] == {"real": "counts", "generated": "log1p", "target_sum": 1000.0}
    assert m["measurement"]["mean_per_gene"] < 0.2 and m["measurement"]["total_per_cell"] < 0.2  # at 1e4: both 1
    out = capsys.readouterr().out
    assert "real counts (normalised to 1000 per cell, then log1p)" in out and "generated log1p" in out


def test_metrics_json_holds_no_nan(tmp_path):
    real = _adata(_counts(20), "r")
    g = np.zeros((10, len(GENES)), np.float32)
    g[:, 0] = 1.5  # one constant gene: the variance and gene-gene correlations are undefined
    m = evaluate_files(real, _adata(g, "g"), tmp_path, plots=False)
    assert np.isnan(m["var_correlation"])
    on_disk = _strict((tmp_path / "metrics.json").read_text())
    assert on_disk["var_correlation"] is None and on_disk["n_real"] == 20


def test_a_prediction_in_counts_is_normalised_like_the_real_counts(tmp_path):
    ctrl, a, b = _counts(30, 1), _counts(30, 2, boost=2), _counts(30, 3, boost=7)
    real = _adata(np.vstack([ctrl, a, b]), "r", perturbation=["control"] * 30 + ["A"] * 30 + ["B"] * 30)
    oracle = _adata(np.vstack([a, b]), "p", perturbation=["A"] * 30 + ["B"] * 30)  # the truth, in counts
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # metrics.json is closed before it is renamed
        m = evaluate_perturbation(real, oracle, "perturbation", "control", cell_eval=False, out_dir=tmp_path)
    assert m["inputs"] == {"real file": "counts", "prediction": "counts", "target_sum": 1e4}
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-6)
    assert m["mean"]["pearson_delta_all"] == pytest.approx(1)
    assert _strict((tmp_path / "metrics.json").read_text())["inputs"]["prediction"] == "counts"
    genes = GENES[:6]  # the prediction's counts over half the genes: normalised over the file's own genes
    with pytest.warns(UserWarning, match="holds counts over 6 genes and the real file over 12"):
        evaluate_perturbation(real, oracle[:, genes].copy(), "perturbation", "control", cell_eval=False)


def test_real_counts_are_normalised_to_the_predictions_target_sum():
    """A model trained at another library size than 10,000 predicts log1p at that size and
    records it (``uns['scidiff_prediction']['target_sum']``); the real counts were normalised to
    10,000 whatever the prediction said, and a perfect prediction scored RMSE 2.29."""
    ctrl, a = _counts(20, 1), _counts(20, 2, boost=2)
    real = _adata(np.vstack([ctrl, a]), "r", perturbation=["control"] * 20 + ["A"] * 20)
    pred = _adata(_log(a, 1000.0), "p", perturbation=["A"] * 20)
    pred.uns["scidiff_prediction"] = {"method": "counterfactual", "target_sum": 1000.0}
    m = evaluate_perturbation(real, pred, "perturbation", "control", cell_eval=False)
    assert m["inputs"]["target_sum"] == 1000.0
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)


def test_a_log1p_prediction_with_negative_values_is_taken_as_is(tmp_path):
    ctrl, a = _counts(20, 1), _counts(20, 2, boost=2)
    real = _adata(np.vstack([ctrl, a]), "r", perturbation=["control"] * 20 + ["A"] * 20)
    pred = _log(a, 1e4) - 0.01  # a mean shift can push values below zero
    m = evaluate_perturbation(real, _adata(pred, "p", perturbation=["A"] * 20), "perturbation", "control",
                              cell_eval=False)
    assert m["inputs"]["prediction"] == "log1p"
    assert m["mean"]["rmse_all"] == pytest.approx(0.01, abs=1e-5)


def test_numeric_group_labels_match_across_files(tmp_path):
    rng = np.random.default_rng(0)
    real = _adata(_counts(40), "r", cluster=rng.integers(0, 2, 40))  # ints
    gen = _adata(_log(_counts(30, 5), 1e4), "g", cluster=rng.integers(0, 2, 30).astype(float))  # 0.0 / 1.0
    m = evaluate_files(real, gen, tmp_path, groupby="cluster", plots=False)
    assert sorted(m["per_cell_type"]) == ["0.0", "1.0"] and m["per_cell_type_skipped"] == {}


def test_mmd_of_a_single_cell_is_nan_without_a_warning():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mmd_rbf(x, x[:1])) and np.isnan(mmd_rbf(x[:1], x))
    assert np.isfinite(mmd_rbf(x, x[:2]))


def test_report_plots_with_one_gene(tmp_path):
    rng = np.random.default_rng(0)
    paths = report_plots(rng.random((10, 1)), rng.random((8, 1)), tmp_path, umap=False)
    assert [p.split("/")[-1] for p in paths] == ["pca.png", "gene_means.png", "gene_variances.png"]
    assert (tmp_path / "pca.png").stat().st_size > 0


def test_dose_key_without_perturbation_is_refused(tmp_path, capsys):
    assert main(["evaluate", "--real", "r.h5ad", "--generated", "g.h5ad", "--dose-key", "dose",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--dose-key score perturbation predictions: add --perturbation" in capsys.readouterr().err


def test_unlabelled_real_cells_are_offered_the_control_label():
    """A screen that leaves its unperturbed cells unlabelled was told to fill them with
    'unknown', a label that matches nothing; the control label is the way out offered."""
    ctrl, a = _counts(20, 1), _counts(20, 2, boost=2)
    real = _adata(np.vstack([ctrl, a]), "r", perturbation=[None] * 20 + ["A"] * 20)
    pred = _adata(_log(a, 1e4), "p", perturbation=["A"] * 20)
    with pytest.raises(ValueError, match="call them control.*fillna\\('ctrl'\\)"):
        evaluate_perturbation(real, pred, "perturbation", "ctrl", cell_eval=False)


def test_a_report_without_plots_leaves_no_earlier_plots_beside_its_metrics(tmp_path):
    """--no-plots into a folder of an earlier report kept its PNGs beside the new metrics.json."""
    real, gen = _adata(_counts(40), "r"), _adata(_log(_counts(40, 5), 1e4), "g")
    assert "pca.png" in evaluate_files(real, gen, tmp_path, plots=True)["plots"]
    (tmp_path / "notes.txt").write_text("mine")
    evaluate_files(real, gen, tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "notes.txt"]
