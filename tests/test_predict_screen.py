"""``scidiff predict`` for screens: many targets in one call on one model (stacked, each target's
rows equal to a single call), the obs columns that describe the perturbation (recorded at set-up,
set at prediction), the baselines as methods (equal to ``predict_baseline``), and the warning for
a control label no cell carries. Real data: a Papalexi et al. 2021 subset (1,000 cells, 299 genes)."""
import os

import anndata as ad
import numpy as np
import pytest
import torch

from shared_data import shared_file

TARGETS = [{"perturbation": "STAT1"}, {"perturbation": "JAK2"}, {"perturbation": "STAT1+JAK2"}]
GROUPS = {"control": 400, "STAT1": 150, "JAK2": 150, "IFNGR1": 150, "CUL3": 150}


def single_thread():
    """Tiny models run fastest on one thread (several fight over a shared machine's cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def papalexi():
    """1,000 Papalexi cells (raw counts; cells with grna_frac_top >= 0.8): 400 controls and 150
    of each of four knockouts."""
    a = ad.read_h5ad(shared_file("papalexi21_thp1_sceptre_lowmoi.h5ad"))
    a = a[a.obs["grna_frac_top"].to_numpy() >= 0.8]
    pert = a.obs["perturbation"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(pert == label), n, replace=False) for label, n in GROUPS.items()])
    a = a[np.sort(keep)].copy()
    del a.obsm["grna_counts"]
    return a


@pytest.fixture(scope="module")
def files(tmp_path_factory, papalexi):
    """The cells as log1p (normalize_total 1e4 + log1p) .h5ad files: all of them (train) and 40
    control cells (the cells every prediction starts from)."""
    root = tmp_path_factory.mktemp("screen")
    log = papalexi.copy()
    x = log.X.toarray() if hasattr(log.X, "toarray") else np.asarray(log.X)
    log.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    log.uns = {}
    control = log[log.obs["perturbation"] == "control"][:40].copy()
    log.write_h5ad(root / "train.h5ad")
    control.write_h5ad(root / "control.h5ad")
    return root, log, control


@pytest.fixture(scope="module")
def run(tmp_path_factory, papalexi):
    """A tiny model (hidden 32, 2 layers, 3 epochs) on the Papalexi cells, saved as a run."""
    import scidiff

    data = scidiff.setup_anndata(papalexi, n_top_genes=None, condition_keys=["bio_rep"],
                                 perturbation_keys=["perturbation"], control_labels=["control"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, conditioning_dim=16,
                                           latent_dim=16)
    scidiff.ScIDiffTrainer(model, data.loader(128, seed=0), device="cpu", early_stopping_patience=None, seed=0,
                           progress=False).train(3)
    path = tmp_path_factory.mktemp("screen_run") / "run"
    scidiff.save_model(model, path)
    return path, model


def test_obs_columns_that_describe_the_perturbation_are_recorded(papalexi, tmp_path, kang_small):
    """Papalexi: ``target`` is a function of ``perturbation`` (recorded, label -> value), ``grna``
    refines it (several guides a target: recorded with no value, so a prediction drops it),
    ``bio_rep`` (a covariate, and not a function of it) and the per-cell numbers are not. Kang:
    none. The record travels through the checkpoint's dict; a dict without it (an old
    checkpoint) loads; the streaming set-up records the same."""
    from scidiff.data import DataSpec, setup_anndata, setup_streaming

    spec = setup_anndata(papalexi, n_top_genes=None, condition_keys=["bio_rep"], perturbation_keys=["perturbation"],
                         control_labels=["control"]).spec
    record = spec.perturbation_columns["perturbation"]
    assert sorted(record) == ["grna", "target"]
    assert record["target"] == {**{k: k for k in GROUPS if k != "control"}, "control": "non-targeting"}
    assert record["grna"] == {}
    assert spec.perturbation_column_values("perturbation", "JAK2+STAT1") == {"target": None, "grna": None}
    assert spec.perturbation_column_values("perturbation", "STAT1") == {"target": "STAT1", "grna": None}
    assert DataSpec.from_dict(spec.to_dict()).perturbation_columns == spec.perturbation_columns
    old = {k: v for k, v in spec.to_dict().items() if k != "perturbation_columns"}
    assert DataSpec.from_dict(old).perturbation_columns == {}
    path = tmp_path / "p.h5ad"
    papalexi.write_h5ad(path)
    streamed = setup_streaming(path, n_top_genes=None, condition_keys=["bio_rep"], perturbation_keys=["perturbation"],
                               control_labels=["control"], covariance=False)
    assert streamed.spec.perturbation_columns == spec.perturbation_columns
    kang = setup_anndata(kang_small, n_top_genes=50, condition_keys=["cell_type"], perturbation_keys=["condition"],
                         control_labels=["control"]).spec
    assert kang.perturbation_columns == {"condition": {}}


def test_a_column_numbered_per_context_is_not_left_at_the_controls_value(tmp_path):
    """Zhao et al. 2021 numbers its samples per patient: ``treatment_id`` 701 is one patient's
    vehicle and another's (PW036) vehicle too, 711 one patient's panobinostat and another's
    vehicle, so it is no function of the treatment and the treatment none of it, yet within each
    patient it names the treatment. Recorded with the patient as context (no value for any label,
    so a prediction drops it), as is ``sample_id``; the patient's own columns (age, gender) and
    the per-cell ``id`` are not. Without the context it was kept at the control cells' value."""
    import scidiff
    from scidiff.data.spec import describing_columns
    from scidiff.tasks.screen import baseline_screen

    zhao = ad.read_h5ad(shared_file("zhao21_glioblastoma_panobinostat_lemur.h5ad"))
    spec = scidiff.setup_anndata(zhao, n_top_genes=None, condition_keys=["patient_id", "treatment"],
                                 perturbation_keys=["treatment"], control_labels=["vehicle (DMSO)"]).spec
    record = spec.perturbation_columns["treatment"]
    assert sorted(record) == ["condition", "sample_id", "treatment_id"]
    assert record["treatment_id"] == {} and record["sample_id"] == {}
    assert record["condition"] == {"vehicle (DMSO)": "ctrl", "0.2 uM panobinostat": "panobinostat"}
    assert "treatment_id" not in describing_columns(zhao.obs, "treatment", exclude={"patient_id"})
    x = zhao.layers["logcounts"]
    log = ad.AnnData(X=x.toarray() if hasattr(x, "toarray") else np.asarray(x), obs=zhao.obs.copy())
    control = log[(log.obs["patient_id"] == "PW030") & (log.obs["condition"] == "ctrl")][:20].copy()
    assert set(control.obs["treatment_id"]) == {"701"}
    pred = baseline_screen("mean-shift", log, control, [{"treatment": "0.2 uM panobinostat"}],
                           perturbation_key="treatment", context_key="patient_id",
                           control_labels=["vehicle (DMSO)"])
    assert "treatment_id" not in pred.obs and "sample_id" not in pred.obs
    assert set(pred.obs["condition"]) == {"panobinostat"} and set(pred.obs["age"]) == set(control.obs["age"])


def test_a_screen_of_three_targets_in_one_call(run, files, capsys):
    """Stacked in the targets' order, each target's rows equal to a single ``perturb`` call;
    ``target`` set from the label (missing for the combination), ``grna`` never the control's;
    the command line gives the same from --target and --targets-file."""
    from scidiff.cli import main
    from scidiff.tasks.perturb import perturb
    from scidiff.tasks.screen import predict_screen

    path, model = run
    root, _, control = files
    n = control.n_obs
    out = predict_screen(model, control, TARGETS, steps=4, seed=3, progress=False)
    texts = ["perturbation=STAT1", "perturbation=JAK2", "perturbation=STAT1+JAK2"]
    assert out.n_obs == 3 * n and list(out.obs["scidiff_target"]) == [t for t in texts for _ in range(n)]
    assert list(out.obs_names[:2]) == [f"{control.obs_names[0]}-0", f"{control.obs_names[1]}-0"]
    assert out.obs_names.is_unique and out.uns["scidiff_prediction"]["targets"] == texts
    for i, target in enumerate(TARGETS):
        rows = slice(i * n, (i + 1) * n)
        single = perturb(model, control, target, steps=4, seed=3, progress=False)
        np.testing.assert_array_equal(out.X[rows], single.X)
        np.testing.assert_array_equal(out.layers["control"][rows], single.layers["control"])
        assert list(out.obs["perturbation"].iloc[rows].astype(str)) == list(single.obs["perturbation"].astype(str))
    target = out.obs["target"]
    assert list(target.iloc[:n].unique()) == ["STAT1"] and list(target.iloc[n:2 * n].unique()) == ["JAK2"]
    assert target.iloc[2 * n:].isna().all() and not (target.astype(str) == "non-targeting").any()
    assert "grna" not in out.obs.columns  # a guide refines the target: no predicted cell has one
    assert np.isfinite(out.obs["scidiff_confidence"].to_numpy()).any()

    tfile = root / "targets.txt"
    # as a spreadsheet program saves it: a byte-order mark and Windows line ends
    tfile.write_bytes("\ufeffperturbation=JAK2   # second\r\n# a screen\r\n\r\nperturbation=STAT1+JAK2\r\n".encode())
    pred = root / "screen.h5ad"
    assert main(["predict", "--model", str(path), "--data", str(root / "control.h5ad"), "--target",
                 "perturbation=STAT1", "--targets-file", str(tfile), "--steps", "4", "--seed", "3", "--threads", "1",
                 "--device", "cpu", "--batch-size", "16", "--out", str(pred)]) == 0
    cli = ad.read_h5ad(pred)
    np.testing.assert_allclose(cli.X, out.X, atol=1e-5)  # the file: its own reading of the control cells
    said = capsys.readouterr().out  # what each target rests on, from the file
    for text in texts:
        rows = cli.obs["scidiff_target"] == text
        route = cli.obs.loc[rows, "scidiff_route"].astype(str).iloc[0]
        conf = float(cli.obs.loc[rows, "scidiff_confidence"].mean())
        assert f"  {text}: {route}, confidence {conf:.2f}" in said
    from scidiff.cli.predict import what_predictions_rest_on
    assert what_predictions_rest_on(str(pred), shown=1)[-1].startswith("  ... 2 more; targets per route: ")
    assert list(cli.obs["scidiff_target"]) == list(out.obs["scidiff_target"])
    assert cli.obs["target"].isna().sum() == n


def test_a_screen_inverts_the_control_cells_once_for_all_its_targets(run, files):
    """The targets of a screen share the control cells' inversions (``perturb``'s ``store``): the
    same predictions with fewer network evaluations than one call per target."""
    from scidiff.tasks.perturb import perturb
    from scidiff.tasks.screen import predict_screen

    _, model = run
    _, _, control = files
    calls = []
    hook = model.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    try:
        single = [perturb(model, control, t, steps=4, seed=3, progress=False) for t in TARGETS]
        apart = sum(calls)
        calls.clear()
        screen = predict_screen(model, control, TARGETS, steps=4, seed=3, progress=False)
        together = sum(calls)
        store = {}
        perturb(model, control, TARGETS[0], steps=4, seed=3, progress=False, store=store)
        calls.clear()
        again = perturb(model, control, TARGETS[0], steps=4, seed=3, progress=False, store=store)
        repeat = sum(calls)
    finally:
        hook.remove()
    np.testing.assert_array_equal(screen.X, np.vstack([a.X for a in single]))
    np.testing.assert_array_equal(again.X, single[0].X)
    assert len(store) > 0 and together < 0.75 * apart
    assert repeat < apart / len(TARGETS) / 2  # the same target again: its decodings alone


BASELINE_CASES = [("no-change", "perturbation=STAT1"), ("mean-shift", "perturbation=STAT1"),
                  ("cell-mean", "perturbation=IFNGR1"), ("additive", "perturbation=STAT1+JAK2"),
                  ("linear", "perturbation=STAT1+CUL3")]


def test_every_baseline_through_the_command_line_equals_predict_baseline(files):
    from scidiff.cli import main
    from scidiff.cli.predict import BASELINE_METHODS
    from scidiff.evaluation.perturbation import BASELINES, predict_baseline

    assert BASELINE_METHODS == BASELINES and [m for m, _ in BASELINE_CASES] == list(BASELINES)
    root, train, control = files
    for method, text in BASELINE_CASES:
        out = root / f"{method}.h5ad"
        assert main(["predict", "--method", method, "--train", str(root / "train.h5ad"), "--data",
                     str(root / "control.h5ad"), "--target", text, "--perturbation-key", "perturbation",
                     "--context-key", "bio_rep", "--control-labels", "control", "--out", str(out)]) == 0
        got = ad.read_h5ad(out)
        label = text.split("=")[1]
        want = predict_baseline(method, train, control, {"perturbation": label}, perturbation_key="perturbation",
                                context_key="bio_rep", control_label="control")
        np.testing.assert_array_equal(got.X, want.X)
        np.testing.assert_array_equal(got.layers["control"], want.layers["control"])
        assert list(got.obs_names) == list(control.obs_names)
        assert got.uns["scidiff_prediction"]["method"] == method
        assert (got.obs["perturbation"] == label).all() and (got.obs["scidiff_target"] == text).all()
        if "+" in label:  # a combination has no single value in the training cells: dropped
            assert "target" not in got.obs.columns
        else:
            assert (got.obs["target"] == label).all()


def test_a_control_label_no_cell_carries_is_warned_about(files):
    import subprocess
    import sys

    from scidiff.cli import main

    root, _, _ = files
    args = ["predict", "--method", "mean-shift", "--train", str(root / "train.h5ad"), "--data",
            str(root / "control.h5ad"), "--target", "perturbation=STAT1", "--control-labels", "control,ctrl_typo",
            "--out", str(root / "warned.h5ad")]
    with pytest.warns(UserWarning, match="control label 'ctrl_typo' matches no cell of --train"):
        assert main(args) == 0
    # the user sees it as the command's own warning line
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "scidiff", *args], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "scidiff predict: warning: control label 'ctrl_typo' matches no cell" in out.stderr
    # no cell carries any: an error, exit status 2
    with pytest.warns(UserWarning, match="ctrl_typo"):
        assert main(args[:-4] + ["--control-labels", "ctrl_typo", "--out", str(root / "none.h5ad")]) == 2


@pytest.mark.parametrize("targets", [TARGETS, TARGETS[:1]])
def test_a_screen_written_target_by_target_holds_the_stacked_screen(run, files, tmp_path, targets):
    """``predict_screen_to_file`` (memory bounded by one target) writes what ``predict_screen``
    stacks in memory: X, layers['control'], obs names and values (categorical and numeric,
    missing where the stacked screen has none), uns; so does ``baseline_screen(out=...)``."""
    from scidiff.data import write_h5ad
    from scidiff.tasks.screen import baseline_screen, predict_screen, predict_screen_to_file

    _, model = run
    _, train, control = files
    control = control.copy()
    control.obs["lane"] = np.arange(control.n_obs, dtype=np.int64) % 3  # an integer column stays integer
    want_path = tmp_path / "stacked.h5ad"
    write_h5ad(predict_screen(model, control, targets, steps=4, seed=3, progress=False), want_path)
    cells, genes = predict_screen_to_file(model, control, targets, tmp_path / "streamed.h5ad", steps=4, seed=3,
                                          progress=False)
    _same_file(ad.read_h5ad(want_path), ad.read_h5ad(tmp_path / "streamed.h5ad"), (cells, genes))
    assert ad.read_h5ad(tmp_path / "streamed.h5ad").obs["lane"].dtype == np.int64
    baseline = dict(perturbation_key="perturbation", context_key="bio_rep", control_labels=["control"])
    write_h5ad(baseline_screen("additive", train, control, targets, **baseline), want_path)
    shape = baseline_screen("additive", train, control, targets, out=tmp_path / "baseline.h5ad", **baseline)
    _same_file(ad.read_h5ad(want_path), ad.read_h5ad(tmp_path / "baseline.h5ad"), shape)


def _same_file(want, got, shape):
    """Two screens' files hold the same cells, values, names and settings."""
    import pandas as pd

    assert shape == want.shape and list(got.var_names) == list(want.var_names)
    np.testing.assert_array_equal(got.X, want.X)
    np.testing.assert_array_equal(got.layers["control"], want.layers["control"])
    assert list(got.obs_names) == list(want.obs_names)
    assert sorted(got.obs.columns) == sorted(want.obs.columns)
    for c in want.obs.columns:
        a, b = want.obs[c], got.obs[c]
        if pd.api.types.is_numeric_dtype(a) and not isinstance(a.dtype, pd.CategoricalDtype):
            np.testing.assert_allclose(b.to_numpy(dtype=float), a.to_numpy(dtype=float), err_msg=c)
            assert b.dtype.kind == a.dtype.kind, (c, a.dtype, b.dtype)
        else:
            assert list(b.astype(object).where(b.notna(), None)) == list(a.astype(object).where(a.notna(), None)), c
    assert got.uns["scidiff_prediction"].keys() == want.uns["scidiff_prediction"].keys()
    texts = [list(f.uns["scidiff_prediction"].get("targets", [])) for f in (got, want)]
    assert texts[0] == texts[1]


def test_the_screen_file_keeps_the_obs_columns_in_order(run, files, tmp_path):
    """The columns come in the order the stacked screen has them (not a set's order, which
    changes from run to run)."""
    from scidiff.data import write_h5ad
    from scidiff.tasks.screen import predict_screen, predict_screen_to_file

    _, model = run
    _, _, control = files
    write_h5ad(predict_screen(model, control, TARGETS[:2], steps=2, progress=False), tmp_path / "a.h5ad")
    predict_screen_to_file(model, control, TARGETS[:2], tmp_path / "b.h5ad", steps=2, progress=False)
    assert list(ad.read_h5ad(tmp_path / "b.h5ad").obs.columns) == list(ad.read_h5ad(tmp_path / "a.h5ad").obs.columns)
