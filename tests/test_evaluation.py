import json

import numpy as np
import pytest

from scidiff.evaluation import (classifier_auc, energy_distance, evaluate_generation_quality, frechet_distance,
                                gene_correlation_preservation, measurement_properties, mmd_rbf)
from scidiff.evaluation.baselines import gaussian_pca_generator


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 3))
    y = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0, 0])
    # |mu|^2 + tr(I + 4I - 2*2I) = 1 + 3
    assert frechet_distance(x, y) == pytest.approx(4.0, rel=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_energy_distance_closed_form_in_1d():
    # for N(0,1) vs N(d,1): 2 E|X-Y| - E|X-X'| - E|Y-Y'| with E|Z| for Z ~ N(m, 2)
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    d = 1.0
    x, y = rng.normal(size=(3000, 1)), rng.normal(size=(3000, 1)) + d
    s = np.sqrt(2)
    e_xy = s * np.sqrt(2 / np.pi) * np.exp(-d**2 / (2 * s**2)) + d * (1 - 2 * norm.cdf(-d / s))
    expected = 2 * e_xy - 2 * s * np.sqrt(2 / np.pi)
    assert energy_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_mmd_is_unbiased_near_zero_and_grows_with_shift():
    rng = np.random.default_rng(2)
    x, x2 = rng.normal(size=(400, 5)), rng.normal(size=(400, 5))
    assert abs(mmd_rbf(x, x2)) < 0.01
    assert mmd_rbf(x, x2 + 0.5) > 0.05 > abs(mmd_rbf(x, x2))
    assert mmd_rbf(x, x2 + 2.0) > mmd_rbf(x, x2 + 0.5)


def test_classifier_auc_chance_and_separable():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert classifier_auc(x, y) == pytest.approx(0.5, abs=0.08)
    assert classifier_auc(x, y + 5) > 0.99


def test_classifier_auc_averages_its_draws():
    from sklearn.metrics import roc_auc_score

    from scidiff.evaluation.metrics import classifier_scores

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(45, 4)) + 0.4
    labels, runs = classifier_scores(x, y, seed=7, repeats=4)
    assert len(runs) == 4 and len({tuple(np.round(r, 6)) for r in runs}) == 4  # four different draws
    aucs = [roc_auc_score(labels, r) for r in runs]
    assert classifier_auc(x, y, seed=7, repeats=4) == pytest.approx(np.mean(aucs), abs=1e-12)
    assert classifier_auc(x, y, seed=7) == pytest.approx(aucs[0], abs=1e-12)  # one draw: the first


def test_measurement_properties_are_kolmogorov_smirnov_statistics():
    """Real cell i detects genes 0..(i mod 10) at 1 (1-10 genes, evenly); generated cells all
    detect genes 0-4: per cell, the detected (and total) counts' distribution functions differ
    most at 5 genes, 0.5 against 1; per gene, the real detection fractions are 0.1-1.0 and the
    generated ones 0 or 1 (half each), which differ most at 0: 0 against 0.5."""
    real = (np.arange(10)[None, :] <= (np.arange(200) % 10)[:, None]).astype(float)
    generated = np.tile((np.arange(10) < 5).astype(float), (50, 1))
    got = measurement_properties(real, generated)
    assert got["detected_per_cell"] == pytest.approx(0.5) and got["total_per_cell"] == pytest.approx(0.5)
    assert got["detection_per_gene"] == pytest.approx(0.5)
    assert all(v == 0 for v in measurement_properties(real, real[::-1]).values())
    with pytest.raises(ValueError, match="real cells have 10 genes and generated cells 9"):
        measurement_properties(real, generated[:, :9])


def test_gene_correlation_preservation():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(500, 1))
    real = np.hstack([z + 0.3 * rng.normal(size=(500, 1)) for _ in range(6)] + [rng.normal(size=(500, 4))])
    same = np.hstack([z + 0.3 * rng.normal(size=(500, 1)) for _ in range(6)] + [rng.normal(size=(500, 4))])
    indep = rng.normal(size=(500, 10))
    assert gene_correlation_preservation(real, same) > 0.95
    assert gene_correlation_preservation(real, indep) < 0.3


def test_evaluate_generation_quality_on_real_cells(kang):
    """Real cells against other real cells score as indistinguishable; a shuffled-gene copy does not."""
    x = kang.X.toarray()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    a, b = x[idx[:600]], x[idx[600:1200]]
    labels = kang.obs["cell_type"].to_numpy()
    same = evaluate_generation_quality(a, b, labels[idx[:600]], labels[idx[600:1200]])
    assert same["classifier_auc"] < 0.6 and same["mean_correlation"] > 0.99 and same["gene_correlation"] > 0.8
    assert set(same) >= {"mmd", "energy_distance", "fid", "classifier_auc", "mean_correlation", "var_correlation",
                         "gene_correlation", "measurement", "per_cell_type"}
    assert "CD4T" in same["per_cell_type"]
    assert same["measurement"] == measurement_properties(a, b)
    assert same["per_cell_type"]["CD4T"]["measurement"] == measurement_properties(
        a[labels[idx[:600]] == "CD4T"], b[labels[idx[600:1200]] == "CD4T"])
    assert same["measurement"]["detected_per_cell"] < 0.15  # real against real
    broken = b[:, rng.permutation(b.shape[1])]
    worse = evaluate_generation_quality(a, broken)
    # each property's distribution over cells or over genes: blind to which gene is which, not to sparsity
    assert max(worse["measurement"].values()) < 0.15
    dense = measurement_properties(a, b + 0.05)
    assert dense["detected_per_cell"] == 1.0 and dense["detection_per_gene"] > 0.5
    for k in ("mmd", "energy_distance", "fid"):
        assert worse[k] > 5 * max(same[k], 1e-3)
    assert worse["classifier_auc"] > 0.95 and worse["mean_correlation"] < 0.5
    with pytest.raises(ValueError, match="generated_cell_types"):
        evaluate_generation_quality(a, b[:500], labels[idx[:600]])
    with pytest.raises(ValueError, match="same genes"):
        evaluate_generation_quality(a, b[:, :10])


def test_gaussian_baseline_matches_moments():
    rng = np.random.default_rng(5)
    train = np.abs(rng.normal(2.0, 0.5, size=(2000, 6)))
    gen = gaussian_pca_generator(train, 4000, n_components=6)
    assert gen.min() >= 0
    np.testing.assert_allclose(gen.mean(0), train.mean(0), atol=0.05)
    np.testing.assert_allclose(gen.std(0), train.std(0), rtol=0.08)


def test_evaluate_names_the_generated_groups_it_cannot_score(tmp_path):
    """``scidiff evaluate --groupby`` of generated cells (a server's .h5ad, say) whose labels the
    real file spells otherwise, or whose group is too small, says so (a warning naming each group
    and metrics.json's ``per_cell_type_skipped``) instead of leaving ``per_cell_type`` short in silence."""
    import anndata as ad
    import pandas as pd

    from scidiff.cli import main

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(20)]

    def cells(labels):
        x = np.log1p(rng.poisson(2.0, (len(labels), len(genes))).astype(np.float32) * 1.5)
        a = ad.AnnData(X=x, obs=pd.DataFrame({"cell_type": pd.Categorical(labels)},
                                             index=[f"c{i}" for i in range(len(labels))]))
        a.var_names = genes
        return a

    cells(["A"] * 20 + ["B"] * 20).write_h5ad(tmp_path / "real.h5ad")
    cells(["A"] * 8 + ["B cells"] * 5 + ["B"] * 2).write_h5ad(tmp_path / "generated.h5ad")
    report = tmp_path / "report"
    with pytest.warns(UserWarning) as caught:
        assert main(["evaluate", "--real", str(tmp_path / "real.h5ad"), "--generated", str(tmp_path / "generated.h5ad"),
                     "--groupby", "cell_type", "--no-plots", "--out", str(report)]) == 0
    said = " ".join(str(w.message) for w in caught)
    assert "--groupby cell_type: 2 group(s) of the generated cells have no per-group scores (1 scored)" in said
    assert "'B cells': not among the real cells' labels" in said and "'B': too few cells to score: 2 generated" in said
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["per_cell_type"]) == {"A"}
    assert set(metrics["per_cell_type_skipped"]) == {"B", "B cells"}
