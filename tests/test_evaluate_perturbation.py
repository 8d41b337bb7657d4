"""``scidiff evaluate --perturbation`` / :func:`scidiff.tasks.evaluate.evaluate_perturbation` on
known examples from real cells (a Papalexi et al. 2021 subset): a prediction equal to the real
perturbed cells scores RMSE 0, Pearson delta 1 and PDS 1, and cell-eval scores it above a no-change
baseline; per context; without cell-eval, a line that says how to install it."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from shared_data import shared_file

KOS = ("STAT1", "IFNGR1", "CUL3")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Real cells (300 controls and 80 of each of three knockouts, log1p of counts normalised to
    1e4), the oracle prediction (the real perturbed cells themselves) and a no-change baseline
    (80 control cells per knockout, labelled with it), as files."""
    a = ad.read_h5ad(shared_file("papalexi21_thp1_sceptre_lowmoi.h5ad"))
    a = a[a.obs["grna_frac_top"].to_numpy() >= 0.8]
    pert = a.obs["perturbation"].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    keep = np.concatenate([rng.choice(np.flatnonzero(pert == k), n, replace=False)
                           for k, n in [("control", 300)] + [(k, 80) for k in KOS]])
    a = a[np.sort(keep)]
    x = a.X.toarray()
    real = ad.AnnData(X=np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32),
                      obs=pd.DataFrame({"perturbation": a.obs["perturbation"].astype(str).to_numpy(),
                                        "bio_rep": a.obs["bio_rep"].astype(str).to_numpy()}, index=a.obs_names))
    real.var_names = [str(g) for g in a.var_names]
    is_ctrl = real.obs["perturbation"].to_numpy() == "control"
    oracle = real[~is_ctrl].copy()
    ctrl = real[is_ctrl]
    nochange = ad.concat([ctrl[:80].copy() for _ in KOS], index_unique="-")
    nochange.obs["perturbation"] = np.repeat(KOS, 80)
    root = tmp_path_factory.mktemp("evaluate_perturbation")
    for name, obj in (("real", real), ("oracle", oracle), ("nochange", nochange)):
        obj.write_h5ad(root / f"{name}.h5ad")
    return root, real, oracle, nochange


def test_the_truth_scores_perfectly_and_beats_no_change_in_cell_eval(example):
    pytest.importorskip("cell_eval", reason="cell-eval is not installed (pip install 'scidiff[celleval]')")
    from scidiff.cli import main

    root, *_ = example
    out = root / "report"
    assert main(["evaluate", "--perturbation", "--real", str(root / "real.h5ad"), "--predicted",
                 str(root / "oracle.h5ad"), "--perturbation-key", "perturbation", "--control-label", "control",
                 "--baseline", f"no-change={root / 'nochange.h5ad'}", "--min-de-genes", "3", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["per_perturbation"]) == sorted(KOS) and m["n_groups"] == 3 and not m["skipped"]
    for k in KOS:
        row = m["per_perturbation"][k]
        assert row["rmse_all"] == pytest.approx(0, abs=1e-6) and row["mae_all"] == pytest.approx(0, abs=1e-6)
        assert row["pearson_delta_all"] == pytest.approx(1) and row["pds_l1"] == 1.0
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-6) and m["mean"]["pearson_delta_all"] == pytest.approx(1)
    base = m["baselines"]["no-change"]["mean"]
    assert base["rmse_all"] > 0.01 and base["pearson_delta_all"] < 0.9
    ce = m["cell_eval"]
    assert ce["installed"] and ce["prediction"]["mean"]["pearson_delta"] == pytest.approx(1)
    assert ce["prediction"]["mean"]["mae"] == pytest.approx(0, abs=1e-6)
    assert ce["score"]["no-change"]["avg_score"] > 0 and ce["score"]["no-change"]["n_perturbations"] == 3


def test_per_context_and_without_cell_eval(example, monkeypatch, capsys):
    """Groups are (context, perturbation); a predicted group without real cells is skipped and
    listed; without cell-eval the project's metrics come with a line saying how to install it."""
    import sys

    from scidiff.cli import main
    from scidiff.tasks.evaluate import evaluate_perturbation

    root, real, oracle, _ = example
    pred = oracle[oracle.obs["bio_rep"] != "rep_3"].copy()
    extra = pred[:5].copy()
    extra.obs["perturbation"], extra.obs["bio_rep"] = "MYC", "rep_1"  # no real cell of it
    extra.obs_names = [f"x{i}" for i in range(5)]
    pred = ad.concat([pred, extra])
    m = evaluate_perturbation(real, pred, "perturbation", context_key="bio_rep", cell_eval=False)
    assert sorted(m["per_perturbation"]) == sorted(f"{r}/{k}" for r in ("rep_1", "rep_2") for k in KOS)
    assert list(m["skipped"]) == ["rep_1/MYC"]
    assert m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-6) and m["mean"]["pds_l1"] == 1.0

    monkeypatch.setitem(sys.modules, "cell_eval", None)
    out = root / "report_no_ce"
    assert main(["evaluate", "--perturbation", "--real", str(root / "real.h5ad"), "--generated",
                 str(root / "oracle.h5ad"), "--perturbation-key", "perturbation", "--out", str(out)]) == 0
    said = capsys.readouterr().err  # a warning: stdout holds the results alone
    assert "scidiff evaluate: warning: cell-eval is not installed" in said and "pip install 'scidiff[celleval]'" in said
    m = json.loads((out / "metrics.json").read_text())
    assert m["cell_eval"]["installed"] is False and m["mean"]["pearson_delta_all"] == pytest.approx(1)

    # GEARS' spelling (ctrl, STAT1+ctrl) is read without --control-label
    for name, obj in (("real", real), ("oracle", oracle)):
        gears = obj.copy()
        labels = gears.obs["perturbation"].astype(str)
        gears.obs["perturbation"] = np.where(labels == "control", "ctrl", labels + "+ctrl")
        gears.write_h5ad(root / f"{name}_gears.h5ad")
    out = root / "report_gears"
    assert main(["evaluate", "--perturbation", "--real", str(root / "real_gears.h5ad"), "--predicted",
                 str(root / "oracle_gears.h5ad"), "--perturbation-key", "perturbation", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["per_perturbation"]) == sorted(KOS) and m["mean"]["rmse_all"] == pytest.approx(0, abs=1e-6)


def test_each_dose_is_a_group_with_a_dose_key():
    """A at doses 1 and 100 (gene 0 up by 1 and 3): a prediction right at each dose but with other
    proportions of the two scores 0 per (perturbation, dose) and not when the doses are pooled."""
    from scidiff.tasks.evaluate import evaluate_perturbation

    rng = np.random.default_rng(0)

    def cells(groups):
        x, obs = [], []
        for label, dose, n in groups:
            block = np.full((n, 5), 1.0) + 0.01 * rng.normal(size=(n, 5))
            block[:, 0] += {0.0: 0.0, 1.0: 1.0, 100.0: 3.0}[dose]
            x.append(block)
            obs += [(label, dose)] * n
        a = ad.AnnData(np.vstack(x).astype(np.float32), obs=pd.DataFrame(obs, columns=["drug", "dose"],
                                                                           index=[f"c{i}" for i in range(len(obs))]))
        a.var_names = [f"g{i}" for i in range(5)]
        return a

    real = cells([("control", 0.0, 50), ("A", 1.0, 50), ("A", 100.0, 50)])
    pred = cells([("A", 1.0, 10), ("A", 100.0, 90)])
    m = evaluate_perturbation(real, pred, "drug", dose_key="dose", cell_eval=False)
    assert sorted(m["per_perturbation"]) == ["A @ 1", "A @ 100"] and m["dose_key"] == "dose"
    assert all(r["rmse_all"] < 0.01 for r in m["per_perturbation"].values())
    pooled = evaluate_perturbation(real, pred, "drug", cell_eval=False)
    assert pooled["per_perturbation"]["A"]["rmse_all"] > 0.3
    pred.obs["dose"] = "high"
    with pytest.raises(ValueError, match=r"obs\['dose'\] of the prediction must be a number"):
        evaluate_perturbation(real, pred, "drug", dose_key="dose", cell_eval=False)
