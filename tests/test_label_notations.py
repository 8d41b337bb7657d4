"""Perturbation labels in the field's notations: ``A+B`` or ``B+A``, GEARS' ``A+ctrl`` for a single
and ``ctrl`` for control, scPerturb's ``A_B`` (``--separator _``). The baselines, the evaluation
and the model's set-up read them all alike; a file that writes combinations with another
separator than the one given is warned about."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scidiff.evaluation.perturbation import BASELINES, perturbation_labels, predict_baseline
from scidiff.tasks.evaluate import evaluate_perturbation

G = 7
PLAIN = {"control": "control", "A": "A", "B": "B", "A+B": "A+B"}
GEARS = {"control": "ctrl", "A": "A+ctrl", "B": "ctrl+B", "A+B": "B+A"}
SCPERTURB = {"control": "control", "A": "A", "B": "B", "A+B": "A_B"}


def _cells(notation: dict, groups=("control", "A", "B"), n: int = 40, seed: int = 0) -> ad.AnnData:
    """Counts-like log1p cells; A raises gene 0, B gene 1, A+B both (the same draws whatever the notation)."""
    rng = np.random.default_rng(seed)
    x, labels = [], []
    for g in groups:
        counts = rng.poisson(2.0, (n, G)).astype(np.float64)
        counts[:, 0] += 4 * ("A" in g)
        counts[:, 1] += 6 * ("B" in g)
        x.append(np.log1p(counts))
        labels += [notation[g]] * n
    a = ad.AnnData(np.vstack(x).astype(np.float32),
                   obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))]))
    a.var_names = [f"g{i}" for i in range(G)]
    return a


def test_labels_are_read_in_canonical_form():
    a = _cells(GEARS, groups=("control", "A", "B", "A+B"), n=2)
    got = perturbation_labels(a, "perturbation", "+", ("ctrl", "control"))
    assert list(got) == ["ctrl"] * 2 + ["A"] * 2 + ["B"] * 2 + ["A+B"] * 2


@pytest.mark.parametrize("notation,separator,controls",
                         [(GEARS, "+", ("ctrl",)), (SCPERTURB, "_", ("control",))])
def test_every_baseline_reads_other_notations_as_plain_labels(notation, separator, controls):
    plain_train, other_train = _cells(PLAIN), _cells(notation)
    control = _cells(PLAIN, groups=("control",), seed=1)
    x = plain_train.X.astype(np.float64)
    ctrl_mean = x[:40].mean(0)
    d_a, d_b = x[40:80].mean(0) - ctrl_mean, x[80:].mean(0) - ctrl_mean
    for method in BASELINES:
        for target in ("A+B", "A"):
            if method == "mean-shift" and target == "A+B":
                continue  # never seen: mean shift refuses it in any notation
            want = predict_baseline(method, plain_train, control, {"perturbation": target},
                                    perturbation_key="perturbation", control_label="control")
            written = notation[target]
            got = predict_baseline(method, other_train, control, {"perturbation": written},
                                   perturbation_key="perturbation", control_label=controls, separator=separator)
            np.testing.assert_allclose(got.X, want.X, rtol=0, atol=1e-6, err_msg=f"{method} {target}")
            assert (got.obs["perturbation"] == written).all()  # the target is written as the user gave it
    # the additive baseline is control + dA + dB, from singles written A+ctrl / ctrl+B
    add = predict_baseline("additive", other_train, control, {"perturbation": notation["A+B"]},
                           perturbation_key="perturbation", control_label=controls, separator=separator)
    np.testing.assert_allclose(add.X.mean(0) - control.X.mean(0), d_a + d_b, atol=1e-5)


def test_the_linear_baseline_has_no_column_for_control():
    """With GEARS labels the multi-hot must not give ``ctrl`` a column: 'A+ctrl' is the single A."""
    train, control = _cells(GEARS), _cells(PLAIN, groups=("control",), seed=1)
    kw = dict(perturbation_key="perturbation", control_label="ctrl", alpha=1e-9)
    single = predict_baseline("linear", train, control, {"perturbation": "A+ctrl"}, **kw).X
    shift = predict_baseline("mean-shift", train, control, {"perturbation": "A"}, **kw).X
    np.testing.assert_allclose(single, shift, atol=1e-4)


def test_the_evaluation_matches_groups_whatever_the_notation():
    real_plain = _cells(PLAIN, groups=("control", "A", "B", "A+B"), seed=2)
    real_gears = _cells(GEARS, groups=("control", "A", "B", "A+B"), seed=2)
    train, control = _cells(PLAIN), _cells(PLAIN, groups=("control",), seed=1)
    pred = ad.concat([predict_baseline("additive", train, control, {"perturbation": t}, perturbation_key="perturbation")
                      for t in ("A", "A+B")], index_unique="-")
    want = evaluate_perturbation(real_plain, pred, "perturbation", "control", cell_eval=False)
    got = evaluate_perturbation(real_gears, pred, "perturbation", ["ctrl", "control"], cell_eval=False)
    assert want["n_groups"] == got["n_groups"] == 2 and not got["skipped"]
    assert set(got["per_perturbation"]) == {"A", "A+B"}
    for group, metrics in want["per_perturbation"].items():
        for name, value in metrics.items():
            if isinstance(value, float):
                assert got["per_perturbation"][group][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_combinations_written_with_another_separator_are_warned_about_and_read_with_it():
    from scidiff import setup_anndata

    cells = _cells(SCPERTURB, groups=("control", "A", "B", "A+B"), n=10)
    with pytest.warns(UserWarning, match=r"1 label\(s\) such as 'A_B'.*--separator '_'"):
        plain = setup_anndata(cells.copy(), n_top_genes=None, perturbation_keys=["perturbation"])
    assert plain.spec.categorical["perturbation"] == ["A", "A_B", "B"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = setup_anndata(cells.copy(), n_top_genes=None, perturbation_keys=["perturbation"], separator="_")
    assert read.spec.categorical["perturbation"] == ["A", "B"] and read.spec.separator == "_"
    rows = read.covariates["perturbation"].numpy()
    np.testing.assert_array_equal(rows[30:40, :2], 1.0)  # A_B cells: both singles
    with warnings.catch_warnings():  # the plain notation raises no hint
        warnings.simplefilter("error")
        setup_anndata(_cells(PLAIN, groups=("control", "A", "B", "A+B"), n=10), n_top_genes=None,
                      perturbation_keys=["perturbation"])


def test_the_command_line_takes_the_separator(tmp_path):
    from scidiff.cli import main
    from scidiff.config import load_config

    train, control = _cells(SCPERTURB), _cells(PLAIN, groups=("control",), seed=1)
    real = _cells(SCPERTURB, groups=("control", "A", "B", "A+B"), seed=2)
    for name, a in (("train", train), ("control", control), ("real", real)):
        a.write_h5ad(tmp_path / f"{name}.h5ad")
    out = tmp_path / "additive.h5ad"
    assert main(["predict", "--method", "additive", "--train", str(tmp_path / "train.h5ad"), "--data",
                 str(tmp_path / "control.h5ad"), "--target", "perturbation=A_B", "--perturbation-key",
                 "perturbation", "--control-labels", "control", "--separator", "_", "--out", str(out)]) == 0
    want = predict_baseline("additive", train, control, {"perturbation": "A_B"}, perturbation_key="perturbation",
                            separator="_")
    np.testing.assert_array_equal(ad.read_h5ad(out).X, want.X)
    assert main(["evaluate", "--perturbation", "--real", str(tmp_path / "real.h5ad"), "--predicted", str(out),
                 "--perturbation-key", "perturbation", "--control-label", "ctrl,control", "--separator", "_",
                 "--out", str(tmp_path / "report")]) == 0
    import json

    report = json.load(open(tmp_path / "report" / "metrics.json"))
    assert report["n_groups"] == 1 and list(report["per_perturbation"]) == ["A_B"]
    for bad in ("", " _"):
        with pytest.raises(SystemExit):
            main(["predict", "--method", "additive", "--data", "x.h5ad", "--target", "perturbation=A", "--separator",
                  bad, "--out", str(tmp_path / "x.h5ad")])
    assert load_config(None, {"data": {"separator": "_"}}).data.covariate_kwargs()["separator"] == "_"


def test_a_name_that_holds_the_separator_is_warned_about():
    """sci-Plex's (+)-JQ1 is one drug: read at '+' it would be a combination of '(' and ')-JQ1',
    neither of which is a perturbation anywhere in the data."""
    from scidiff import setup_anndata

    drugs = {"control": "control", "A": "(+)-JQ1", "B": "Dacinostat", "A+B": "(+)-JQ1"}
    cells = _cells(drugs, groups=("control", "A", "B"), n=10)
    with pytest.warns(UserWarning, match=r"'\(\+\)-JQ1' are read as combinations \('\(' \+ '\)-JQ1'\)"):
        setup_anndata(cells.copy(), n_top_genes=None, perturbation_keys=["perturbation"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = setup_anndata(cells.copy(), n_top_genes=None, perturbation_keys=["perturbation"], separator="|")
    assert read.spec.categorical["perturbation"] == ["(+)-JQ1", "Dacinostat"]


@pytest.mark.parametrize("notation", [GEARS, PLAIN])
def test_a_screen_given_as_a_plain_covariate_is_warned_about(notation):
    """GEARS' A+ctrl, or A+B beside A and B, as a plain covariate (no perturbation_keys): each label
    a category of its own; the warning names the key and the flag. Cell types holding '+'
    (Kang's CD14+Mono) and perturbation keys are not warned about."""
    from scidiff import setup_anndata

    cells = _cells(notation, groups=("control", "A", "B", "A+B"), n=10)
    with pytest.warns(UserWarning, match=r"obs\['perturbation'\] .* reads as a perturbation screen .*"
                                         r"--perturbation-keys perturbation"):
        setup_anndata(cells.copy(), n_top_genes=None, condition_keys=["perturbation"])
    types = cells.copy()
    types.obs["cell_type"] = np.where(np.arange(types.n_obs) % 2, "CD14+Mono", "FCGR3A+Mono")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_anndata(types.copy(), n_top_genes=None, condition_keys=["cell_type"])
        setup_anndata(types, n_top_genes=None, condition_keys=["cell_type"], perturbation_keys=["perturbation"])
