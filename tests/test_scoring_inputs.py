"""``scidiff evaluate`` (``--perturbation``) on files a computational biologist brings from
elsewhere: log2 files, log1p normalised to another library size, labels numeric in one file and
text in the other, missing labels written as the text 'nan', genes named twice, and the report's
path. Small synthetic AnnData, and a Papalexi et al. 2021 subset where the shared data is."""
import json
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scidiff.cli import main
from scidiff.tasks.evaluate import evaluate_files, evaluate_perturbation
from shared_data import shared_file

GENES = [f"G{i}" for i in range(12)]
N = 30


def _counts(n, seed, boost=None):
    rng = np.random.default_rng(seed)
    lam = np.linspace(1, 8, len(GENES))
    if boost is not None:
        lam = lam.copy()
        lam[boost] *= 5
    return rng.poisson(lam, size=(n, len(GENES))).astype(np.float32)  # zeros in G0 (Poisson(1)), as in real files


def _adata(x, prefix, **obs):
    a = ad.AnnData(X=np.asarray(x, np.float32), obs=pd.DataFrame(obs, index=[f"{prefix}{i}" for i in range(len(x))]))
    a.var_names = GENES
    return a


def _norm(counts, target):
    return counts / counts.sum(1, keepdims=True) * target


CTRL, A, B = _counts(N, 1), _counts(N, 2, boost=2), _counts(N, 3, boost=7)
LABELS = ["control"] * N + ["A"] * N + ["B"] * N


def _real(x=None, **obs):
    return _adata(np.vstack([CTRL, A, B]) if x is None else x, "r", **{"perturbation": LABELS, **obs})


def _oracle(x=None, **obs):
    """The real perturbed cells themselves, log1p of counts normalised to 10,000 unless ``x``."""
    x = np.log1p(_norm(np.vstack([A, B]), 1e4)) if x is None else x
    return _adata(x, "p", **{"perturbation": ["A"] * N + ["B"] * N, **obs})


def _score(real, pred, **kw):
    return evaluate_perturbation(real, pred, "perturbation", "control", cell_eval=False, **kw)


def test_log2_files_are_refused_not_read_as_log1p():
    """log2(x + 1) of normalised counts was read as log1p: a perfect prediction scored RMSE 2.87."""
    log2 = np.log2(_norm(np.vstack([A, B]), 1e4) + 1)
    with pytest.raises(ValueError, match=r"X of the prediction looks log2-transformed.*sums to 10,000.*np\.log\(2\)"):
        _score(_real(), _oracle(log2))
    real_log2 = np.log2(_norm(np.vstack([CTRL, A, B]), 1e4) + 1)
    with pytest.raises(ValueError, match="X of the real file looks log2-transformed"):
        _score(_real(real_log2), _oracle())
    m = _score(_real(real_log2 * np.log(2)), _oracle(log2 * np.log(2)))  # converted as the error says: exact
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)


def test_real_log1p_is_rescaled_to_the_library_size_the_prediction_records():
    """A model trained at 1,000 predicts log1p at 1,000 and records it; a real file of log1p at
    10,000 was taken as is (only real counts were normalised to it): the truth scored RMSE 2.28."""
    real = _real(np.log1p(_norm(np.vstack([CTRL, A, B]), 1e4)))
    pred = _oracle(np.log1p(_norm(np.vstack([A, B]), 1e3)))
    pred.uns["scidiff_prediction"] = {"method": "counterfactual", "target_sum": 1000.0}
    with pytest.warns(UserWarning, match="real file are normalised to 10,000 per cell.*rescaled to 1,000"):
        m = _score(real, pred)
    assert m["inputs"]["real file"] == "log1p (normalised to 10000, rescaled to 1000)"
    assert m["inputs"]["target_sum"] == 1000.0
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)
    assert m["mean"]["pearson_delta_all"] == pytest.approx(1)


def test_another_tools_log1p_at_another_library_size_is_brought_to_the_real_scale():
    """A prediction of log1p CPM (another tool's, every gene, nothing recorded) against real
    counts, and real log1p normalised to scanpy's median total against a prediction at 10,000,
    were compared at two scales; a mean per group (cells repeated) says nothing of its scale and
    is taken as is."""
    m = _score(_real(), _oracle(np.log1p(_norm(np.vstack([A, B]), 1e6))))
    assert m["inputs"]["prediction"] == "log1p (normalised to 1e+06, rescaled to 10000)"
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)
    counts = np.vstack([CTRL, A, B])
    median = float(np.median(counts.sum(1)))
    m = _score(_real(np.log1p(_norm(counts, median))), _oracle())
    assert m["inputs"]["target_sum"] == pytest.approx(median, rel=1e-4)
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)
    truth = np.log1p(_norm(np.vstack([A, B]), 1e4))
    means = np.vstack([np.tile(truth[:N].mean(0), (N, 1)), np.tile(truth[N:].mean(0), (N, 1))])
    m = _score(_real(), _oracle(means))  # the per-gene means of the truth: RMSE 0 at the real scale
    assert m["inputs"]["prediction"] == "log1p" and m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)


def test_missing_labels_written_as_text_are_refused():
    """NaN labels saved after ``astype(str)`` read 'nan' in both files and were scored as a
    perturbation called 'nan'; a generated file's 'nan' cell type was a group of its own."""
    labels = pd.Series(["control"] * N + ["A"] * N + [np.nan] * N).astype(str).to_numpy()
    pred = _oracle(perturbation=["A"] * N + ["nan"] * N)
    with pytest.raises(ValueError, match=r"obs\['perturbation'\] of the real file labels 30 cells \['nan'\]"):
        _score(_real(perturbation=labels), pred)
    with pytest.raises(ValueError, match=r"obs\['perturbation'\] of the prediction labels 30 cells \['nan'\]"):
        _score(_real(), pred)
    with pytest.raises(ValueError, match=r"obs\['cell_line'\] of the prediction labels 30 cells \['None'\]"):
        _score(_real(cell_line=["THP1"] * 3 * N), _oracle(cell_line=["THP1"] * N + ["None"] * N),
               context_key="cell_line")
    real = _real(cell_type=["T"] * 3 * N)
    gen = _oracle(cell_type=pd.Categorical(["T"] * N + [np.nan] * N))
    with pytest.raises(ValueError, match=r"obs\['cell_type'\] of the generated file has 30 missing values"):
        evaluate_files(real, gen, None, groupby="cell_type", plots=False)


def test_numeric_labels_in_one_file_match_text_in_the_other():
    """Integer-coded guides (and cell lines) in the real file, the same codes as text (or floats)
    in the prediction: ``1`` was read as ``1.0`` in one file and ``1`` in the other, and nothing
    was scored."""
    codes = [0] * N + [1] * N + [2] * N
    real = _real(perturbation=codes, line=[7] * 3 * N)
    pred = _oracle(perturbation=["1"] * N + ["2"] * N, line=[7.0] * 2 * N)
    m = evaluate_perturbation(real, pred, "perturbation", "0", context_key="line", cell_eval=False)
    assert sorted(m["per_perturbation"]) == ["7.0/1.0", "7.0/2.0"] and not m["skipped"]
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)


def test_genes_named_twice_are_refused():
    """A prediction naming G0 twice (G11's column called G0) scored G11's values as G0 in silence."""
    pred = _oracle()
    pred.var_names = GENES[:11] + ["G0"]
    with pytest.raises(ValueError, match=r"the prediction names 1 genes more than once: \['G0'\]"):
        _score(_real(), pred)
    real = _real()
    real.var_names = ["G1"] + GENES[1:]
    with pytest.raises(ValueError, match=r"the real file names 1 genes more than once: \['G1'\]"):
        _score(real, _oracle()[:, GENES[1:]].copy())


def test_the_report_path_printed_is_the_file_written(tmp_path, capsys, monkeypatch):
    """--out 'report/' printed 'report//metrics.json'. Without cell-eval (made absent here)."""
    monkeypatch.setitem(sys.modules, "cell_eval", None)
    _real().write_h5ad(tmp_path / "real.h5ad")
    _oracle().write_h5ad(tmp_path / "pred.h5ad")
    out = f"{tmp_path / 'report'}/"
    assert main(["evaluate", "--perturbation", "--real", str(tmp_path / "real.h5ad"), "--predicted",
                 str(tmp_path / "pred.h5ad"), "--perturbation-key", "perturbation", "--out", out]) == 0
    said = capsys.readouterr()
    assert f"wrote {tmp_path / 'report' / 'metrics.json'}\n" in said.out and "cell-eval is not installed" in said.err
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["cell_eval"]["installed"] is False
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)


def test_a_screen_scored_against_another_tools_cpm_prediction():
    """Papalexi knockouts (counts, 100 genes) against the same cells written by another tool as
    log1p CPM with the combination notation reversed and categorical labels: the truth scores
    RMSE 0 and PDS 1; the same in log2 is refused."""
    a = ad.read_h5ad(shared_file("papalexi21_thp1_sceptre_lowmoi.h5ad"))
    pert = a.obs["perturbation"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(pert == k), n, replace=False)
                           for k, n in (("control", 120), ("STAT1", 40), ("IFNGR1", 40))])
    x = a.X[np.sort(keep)].toarray()
    genes = np.argsort(-x.sum(0))[:100]
    x = x[:, genes]
    obs = pd.DataFrame({"guide": pert[np.sort(keep)]}, index=a.obs_names[np.sort(keep)])
    real = ad.AnnData(X=x.astype(np.float32), obs=obs)
    real.var_names = [str(g) for g in a.var_names[genes]]
    perturbed = real[real.obs["guide"] != "control"]
    cpm = ad.AnnData(X=np.log1p(_norm(perturbed.X, 1e6)).astype(np.float32), var=perturbed.var,
                     obs=pd.DataFrame({"guide": pd.Categorical(perturbed.obs["guide"] + "+ctrl")},
                                      index=perturbed.obs_names))
    m = evaluate_perturbation(real, cpm, "guide", ["control", "ctrl"], cell_eval=False)
    assert sorted(m["per_perturbation"]) == ["IFNGR1", "STAT1"]
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5) and m["mean"]["pds_l1"] == 1.0
    cpm.X = np.log2(_norm(perturbed.X, 1e6) + 1).astype(np.float32)
    with pytest.raises(ValueError, match="looks log2-transformed"):
        evaluate_perturbation(real, cpm, "guide", ["control", "ctrl"], cell_eval=False)


def test_control_cells_without_a_dose_are_scored_against():
    """A dosed screen's vehicle cells have no dose (NaN, or 'nan' as text): they were refused as
    unlabelled, though only perturbed cells need a dose (and 'unknown', the fill offered, is none)."""
    for dose in ([np.nan] * N + [1.0] * 2 * N, ["nan"] * N + ["1"] * 2 * N):
        m = _score(_real(dose=dose), _oracle(dose=[1.0] * 2 * N), dose_key="dose")
        assert sorted(m["per_perturbation"]) == ["A @ 1", "B @ 1"]
        assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-5)


def test_an_all_zero_prediction_is_refused_and_unpredicted_groups_are_listed():
    """A prediction left in a layer (X all zeros) scored as a prediction of zeros; real
    perturbations the prediction leaves out were named nowhere."""
    pred = _oracle(np.zeros((2 * N, len(GENES))))
    pred.layers["predicted"] = np.log1p(_norm(np.vstack([A, B]), 1e4))
    with pytest.raises(ValueError, match=r"X of the prediction is all zeros on the 12 scored genes; its layers "
                                         r"\['predicted'\]"):
        _score(_real(), pred)
    m = _score(_real(), _oracle()[:N].copy())
    assert sorted(m["per_perturbation"]) == ["A"] and m["not_predicted"] == ["B"]


def test_an_out_dir_that_is_a_file_is_refused_before_scoring(tmp_path, monkeypatch):
    """From Python, out_dir= an existing file did all the scoring and then failed in os.makedirs."""
    import scidiff.tasks.evaluate as evaluate

    path = tmp_path / "metrics"
    path.write_text("keep me")
    monkeypatch.setattr(evaluate, "_read", lambda *a: pytest.fail("read before out_dir was checked"))
    with pytest.raises(ValueError, match="out_dir .*metrics' is a file"):
        _score(_real(), _oracle(), out_dir=path)
    with pytest.raises(ValueError, match="out_dir .*metrics' is a file"):
        evaluate_files(_real(), _oracle(), path)
    assert path.read_text() == "keep me"
