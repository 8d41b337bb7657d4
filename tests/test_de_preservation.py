"""Generated vs real log fold changes (scidiff.evaluation.differential), against planted truth."""
import numpy as np

from scidiff.evaluation.differential import de_preservation, lfc_agreement, log_fold_changes, top_de_genes


def _cells(rng, mean, n=400, sd=0.3):
    return mean + sd * rng.normal(size=(n, len(mean)))


def test_top_de_genes_finds_the_planted_changes():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, 200)
    shift = np.zeros(200)
    shift[[3, 50, 120]] = [1.0, -0.8, 0.6]
    control, treated = _cells(rng, base), _cells(rng, base + shift)
    assert set(top_de_genes(control, treated, 3).tolist()) == {3, 50, 120}
    np.testing.assert_allclose(log_fold_changes(control, treated)[[3, 50, 120]], [1.0, -0.8, 0.6], atol=0.06)


def test_an_attenuated_generator_has_the_attenuation_as_slope():
    real = np.linspace(-2, 2, 50)
    assert np.allclose(list(lfc_agreement(0.5 * real + 0.1, real).values()), [0.5, 1.0])
    out = lfc_agreement(np.zeros(50), real)
    assert out["slope"] == 0 and np.isnan(out["pearson"])  # nothing kept: no correlation to speak of
    assert np.isnan(lfc_agreement(real, np.zeros(50))["slope"])


def test_de_preservation_scores_each_generator_on_genes_chosen_on_the_reference():
    rng = np.random.default_rng(1)
    base = rng.uniform(1, 3, 300)
    shift = np.where(rng.random(300) < 0.2, rng.normal(0, 1, 300), 0.0)
    ref = (_cells(rng, base), _cells(rng, base + shift))
    real = (_cells(rng, base), _cells(rng, base + shift))
    halved = (_cells(rng, base, 2000), _cells(rng, base + 0.5 * shift, 2000))
    exact = (_cells(rng, base, 2000), _cells(rng, base + shift, 2000))
    out = de_preservation(*real, {"halved": halved, "exact": exact}, reference=ref, n_genes=40)
    assert out["genes"] == top_de_genes(*ref, 40).tolist()
    assert abs(out["halved"]["slope"] - 0.5) < 0.05 and abs(out["exact"]["slope"] - 1.0) < 0.08
    assert out["exact"]["pearson"] > 0.98 and out["halved"]["pearson"] > 0.98
