"""A combinatorial CRISPRa screen shaped like Norman et al. 2019 (K562) as a first-time user runs it:
control cells ``ctrl``, singles written GEARS' way with the control inside (``CEBPA+ctrl``, and
also ``ctrl+KLF1``: each guide position), doubles ``CEBPA+SPI1``, some never seen; the same screen
written with ``|`` instead of ``+``; the unseen doubles predicted and scored against real cells that
write them in the other order. The set-up, the prediction's ``obs`` columns, the refusal of a
target written with another separator, and the PDS of a double are checked against the truth of
the data. Tiny synthetic data and model; each fix reproduced first (the test failed before it)."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.evaluation.perturbation import discrimination_score
from scidiff.tasks.evaluate import evaluate_perturbation
from test_predict_screen import single_thread

GENES = 24
SINGLES = ["CEBPA", "KLF1", "SPI1", "GATA1"]
# Norman's labels: the singles as either guide position holds them, two doubles seen in training
LABELS = {"ctrl": [], "CEBPA+ctrl": ["CEBPA"], "KLF1+ctrl": ["KLF1"], "ctrl+KLF1": ["KLF1"], "SPI1+ctrl": ["SPI1"],
          "ctrl+GATA1": ["GATA1"], "CEBPA+SPI1": ["CEBPA", "SPI1"], "KLF1+GATA1": ["KLF1", "GATA1"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


def _guide(label: str) -> str:
    """Norman's guide_identity: each position's guide, NegCtrl0 for none (KLF1_NegCtrl0 and NegCtrl0_KLF1 differ)."""
    return "_".join("NegCtrl0" if p == "ctrl" else p for p in label.split("+")) if label != "ctrl" else "NegCtrl0"


def _screen(labels=LABELS, separator: str = "+", n: int = 20, seed: int = 0) -> ad.AnnData:
    """Poisson counts over genes named after the targets (then g4, g5, ...), each single raising
    its own gene and three others; ``nperts`` and ``guide_identity`` as Norman's obs has them."""
    rng = np.random.default_rng(0)
    base = rng.uniform(3, 12, GENES)
    effect = {s: np.zeros(GENES) for s in SINGLES}
    for i, s in enumerate(SINGLES):
        effect[s][i] = 1.5
        effect[s][4 + 3 * i:7 + 3 * i] = 0.8
    draw = np.random.default_rng(seed)
    xs, obs = [], []
    for label, parts in labels.items():
        m = 3 * n if label == "ctrl" else n
        xs.append(draw.poisson(base * np.exp(sum((effect[p] for p in parts), np.zeros(GENES))), (m, GENES)))
        obs += [(label.replace("+", separator), len(parts), _guide(label))] * m
    a = ad.AnnData(np.vstack(xs).astype(np.float32),
                   obs=pd.DataFrame(obs, columns=["condition", "nperts", "guide_identity"]))
    a.obs_names = [f"c{seed}_{i}" for i in range(a.n_obs)]
    a.var_names = SINGLES + [f"g{i}" for i in range(len(SINGLES), GENES)]
    return a


def _tiny_model(a: ad.AnnData):
    """A tiny model trained one epoch on the screen ``a`` (control ``ctrl``)."""
    cells = scidiff.setup_anndata(a, n_top_genes=None, perturbation_keys=["condition"], control_labels=["ctrl"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(cells, hidden_dim=16, num_layers=1, num_timesteps=10, conditioning_dim=8,
                                           latent_dim=4)
    scidiff.ScIDiffTrainer(model, cells.loader(128, seed=0), device="cpu", progress=False,
                           early_stopping_patience=None, seed=0).train(1)
    return model


@pytest.fixture(scope="module")
def norman():
    """``(model, control cells)``: a tiny model trained one epoch on the screen."""
    a = _screen()
    model = _tiny_model(a)
    return model, a[(a.obs["condition"] == "ctrl").to_numpy()][:6].copy()


def test_a_screen_in_gears_notation_with_another_separator_is_warned_about():
    """``CEBPA|ctrl``, ``ctrl|KLF1`` and ``CEBPA|SPI1`` read at ``+`` are seven perturbations of
    their own, with no combination to learn; no single stands alone (each holds the control), so
    the hint for another separator said nothing. With ``separator='|'`` they are four singles."""
    bar = _screen(separator="|", n=4)
    with pytest.warns(UserWarning, match=r"label\(s\) such as 'CEBPA\|SPI1' join labels .* --separator '\|'"):
        plain = scidiff.setup_anndata(bar.copy(), n_top_genes=None, perturbation_keys=["condition"],
                                      control_labels=["ctrl"])
    assert len(plain.spec.categorical["condition"]) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = scidiff.setup_anndata(bar, n_top_genes=None, perturbation_keys=["condition"], control_labels=["ctrl"],
                                     separator="|")
    assert read.spec.categorical["condition"] == sorted(SINGLES)


def test_a_single_written_in_both_guide_orders_gets_no_guide_of_one_of_them(norman):
    """KLF1's training cells carry ``KLF1_NegCtrl0`` and ``NegCtrl0_KLF1``: its predicted cells
    carry neither (it took the first spelling's), while ``nperts`` (1 under both) is kept; a seen
    double asked for in the other order gets its own guide and 2, an unseen one none."""
    model, control = norman
    want = {"KLF1": (None, 1.0), "ctrl+KLF1": (None, 1.0), "CEBPA": ("CEBPA_NegCtrl0", 1.0),
            "GATA1+KLF1": ("KLF1_GATA1", 2.0), "KLF1+CEBPA": (None, None)}
    for target, (guide, nperts) in want.items():
        pred = scidiff.perturb(model, control, {"condition": target}, steps=2, progress=False)
        got = pred.obs.get("guide_identity", pd.Series([None] * pred.n_obs))
        assert got.isna().all() if guide is None else (got == guide).all(), (target, list(got.unique()))
        if nperts is None:
            assert "nperts" not in pred.obs or pred.obs["nperts"].isna().all(), target
        else:
            np.testing.assert_array_equal(pred.obs["nperts"].to_numpy(float), nperts, err_msg=target)


def test_a_baseline_of_a_single_written_in_both_guide_orders_gets_no_guide_of_one_of_them():
    """As the model's: the baselines (scidiff predict --method without --model) gave KLF1's cells
    the first spelling's guide, ``KLF1_NegCtrl0``; now none, ``nperts`` 1 kept."""
    from scidiff.tasks.screen import baseline_screen

    train = _screen()
    control = train[(train.obs["condition"] == "ctrl").to_numpy()].copy()
    pred = baseline_screen("additive", train, control, [{"condition": "KLF1"}, {"condition": "KLF1+GATA1"}],
                           perturbation_key="condition", control_labels=["ctrl"])
    single = (pred.obs["condition"] == "KLF1").to_numpy()
    assert pred.obs["guide_identity"][single].isna().all()
    np.testing.assert_array_equal(pred.obs["nperts"][single].to_numpy(float), 1.0)
    assert (pred.obs["guide_identity"][~single] == "KLF1_GATA1").all()


@pytest.mark.parametrize("written,rewrite", [("KLF1_CEBPA", r"KLF1\+CEBPA"), ("CEBPA|ctrl", "CEBPA"),
                                             ("KLF1 _ SPI1", r"KLF1\+SPI1")])
def test_a_target_joined_with_another_separator_names_the_models(norman, written, rewrite):
    """scPerturb's ``KLF1_CEBPA`` on a model trained on ``A+B`` labels joins two singles it saw: it
    was refused as an unknown perturbation (or, with a prior, one no feature table describes, to
    be added to a TSV and trained again). The error names the model's separator and the label."""
    model, control = norman
    with pytest.raises(ValueError, match=rf"joined with '\+'.*write condition={rewrite}$"):
        scidiff.perturb(model, control, {"condition": written}, steps=2, progress=False)


def _log_cells(groups: dict, n: int = 12, seed: int = 0) -> ad.AnnData:
    """log1p-like cells: label -> mean over GENES genes, plus noise 0.05."""
    rng = np.random.default_rng(seed)
    x = np.vstack([mean + rng.normal(0, 0.05, (n, len(mean))) for mean in groups.values()])
    a = ad.AnnData(x.astype(np.float32), obs=pd.DataFrame({"condition": np.repeat(list(groups), n)},
                                                          index=[f"c{seed}_{i}" for i in range(len(x))]))
    a.var_names = SINGLES[:2] + [f"g{i}" for i in range(2, 12)]
    return a


def test_the_pds_of_a_double_leaves_both_of_its_genes_out():
    """CRISPRa raises the targeted genes themselves; the PDS leaves a single's own gene out, and
    a double's two genes were both kept. Here the prediction of CEBPA+KLF1 misses KLF1's own
    rise (+3) and has every other gene right: with KLF1's gene in, it lies nearer the real CEBPA
    than the real double (PDS 2/3); without it, nearest the double (PDS 1). The real file writes
    the double in the other order and the singles GEARS' way."""
    base = np.full(12, 2.0)
    cebpa, klf1 = np.zeros(12), np.zeros(12)
    cebpa[0], cebpa[2:6] = 3.0, 1.0
    klf1[1], klf1[6:8] = 3.0, 1.0
    real = _log_cells({"ctrl": base, "CEBPA+ctrl": base + cebpa, "ctrl+KLF1": base + klf1,
                       "KLF1+CEBPA": base + cebpa + klf1})
    missed = cebpa + klf1
    missed[1] = 0.0
    pred = _log_cells({"CEBPA": base + cebpa, "KLF1": base + klf1, "CEBPA+KLF1": base + missed}, seed=1)
    got = evaluate_perturbation(real, pred, "condition", "ctrl", cell_eval=False)["per_perturbation"]
    x_r, x_p = np.asarray(real.X, float), np.asarray(pred.X, float)
    ctrl = x_r[:12].mean(0)
    real_eff = np.stack([x_r[12 * i:12 * (i + 1)].mean(0) - ctrl for i in (1, 2, 3)])
    pred_eff = np.stack([x_p[12 * i:12 * (i + 1)].mean(0) - ctrl for i in (0, 1, 2)])
    want = discrimination_score(pred_eff, real_eff, "l1", exclude=[[0], [1], [0, 1]])
    np.testing.assert_allclose(want, 1.0)
    assert discrimination_score(pred_eff, real_eff, "l1", exclude=[[0], [1], None])[2] == pytest.approx(2 / 3)
    assert [got[k]["pds_l1"] for k in ("CEBPA", "KLF1", "CEBPA+KLF1")] == pytest.approx(list(want))


def test_scoring_files_that_join_singles_with_another_separator_is_warned_about():
    """A real file written ``CEBPA|KLF1`` scored without ``--separator '|'``: ``KLF1|CEBPA`` of the
    prediction met no real group and was skipped, and the singles ``CEBPA|ctrl`` were scored as
    perturbations of their own, without a word. A file of doubles alone (no single beside them)
    read at its own separator raises nothing."""
    base = np.full(12, 2.0)
    real = _log_cells({"ctrl": base, "CEBPA|ctrl": base + 1, "ctrl|KLF1": base - 1, "CEBPA|KLF1": base + 2})
    pred = _log_cells({"CEBPA|ctrl": base + 1, "KLF1|CEBPA": base + 2}, seed=1)
    with pytest.warns(UserWarning, match=r"the real file: 3 label\(s\) such as 'CEBPA\|KLF1'.*--separator '\|'"):
        evaluate_perturbation(real, pred, "condition", "ctrl", cell_eval=False)
    doubles = _log_cells({"ctrl": base, "CEBPA+KLF1": base + 2, "KLF1+SPI1": base + 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = evaluate_perturbation(real, pred, "condition", "ctrl", cell_eval=False, separator="|")
        assert set(got["per_perturbation"]) == {"CEBPA", "CEBPA|KLF1"} and not got["skipped"]
        evaluate_perturbation(doubles, doubles, "condition", "ctrl", cell_eval=False)


def test_the_fit_says_one_seen_double_is_too_few_to_cross_validate():
    """With one double seen, leave-one-combination-out has nothing to fit on: the training summary
    read ``(1 seen; CV MSE no seen combination to cross-validate)``, one seen and none at once."""
    from scidiff.models.effects import PerturbationEffects
    from scidiff.tasks.train import effects_summary

    one = {k: v for k, v in LABELS.items() if k != "KLF1+GATA1"}
    lines = {}
    for name, labels in (("one", one), ("two", LABELS)):
        cells = scidiff.setup_anndata(_screen(labels, n=6), n_top_genes=None, perturbation_keys=["condition"],
                                      control_labels=["ctrl"])
        effects = PerturbationEffects(["condition"], [])
        lines[name] = effects_summary(effects.fit(cells.x, cells.covariates))
    assert "combinations additive (1 seen; too few to cross-validate: leaving one out needs two)" in lines["one"]
    assert "(2 seen; CV MSE additive " in lines["two"]


def test_a_list_of_labels_for_one_target_is_refused_naming_the_screen(norman):
    """``perturb(model, cells, {'condition': ['CEBPA+KLF1', 'KLF1']})``: the list's text was split
    at '+' and ``"['CEBPA"`` refused as a perturbation never seen."""
    model, control = norman
    for labels in (["CEBPA+KLF1", "KLF1"], np.array(["KLF1+CEBPA"] * control.n_obs)):
        with pytest.raises(ValueError, match=r"a target gives one label per key .*predict_screen"):
            scidiff.perturb(model, control, {"condition": labels}, steps=2, progress=False)


def test_a_control_label_that_holds_the_separator_is_control():
    """scPerturb-style ``_`` with guides' controls named ``NTC_1``: the baselines and the scorer split
    it at ``_`` and sorted its parts, ``1_NTC``, a perturbation of its own; the model reads it as
    control. The additive baseline of CEBPA_KLF1 is then control + dCEBPA + dKLF1."""
    from scidiff.evaluation.perturbation import perturbation_labels, predict_baseline

    base = np.full(12, 2.0)
    train = _log_cells({"NTC_1": base, "CEBPA": base + 1, "KLF1": base - 0.5})
    assert set(perturbation_labels(train, "condition", "_", ["NTC_1"])) == {"NTC_1", "CEBPA", "KLF1"}
    control = train[:12].copy()
    pred = predict_baseline("additive", train, control, {"condition": "KLF1_CEBPA"}, perturbation_key="condition",
                            control_label="NTC_1", separator="_")
    x = np.asarray(train.X, float)
    want = x[:12] + (x[12:24].mean(0) - x[:12].mean(0)) + (x[24:].mean(0) - x[:12].mean(0))
    np.testing.assert_allclose(pred.X, want, atol=1e-5)


def test_a_single_seen_only_inside_doubles_rests_on_their_cells():
    """Training groups ctrl, A, A+B and A+C (60 cells each): B's change is A+B's minus A's, the
    model's additive fit, and its prediction moves B's genes; but its confidence was 0 (no group
    is B alone), and B+C's, resting on the same cells, 0 too. Now each such pair counts
    ``1 / (1/60 + 1/60) = 30`` cells, ``30 / (30 + 30) = 0.5``; a seen group keeps its own count."""
    genes = 20
    rng = np.random.default_rng(0)
    base = rng.uniform(3, 12, genes)
    effect = {s: np.where(np.arange(genes) // 3 == i, 1.0, 0.0) for i, s in enumerate("ABC")}
    groups = {"ctrl": [], "A": ["A"], "A+B": ["A", "B"], "A+C": ["A", "C"]}
    x = np.vstack([rng.poisson(base * np.exp(sum((effect[p] for p in parts), np.zeros(genes))), (60, genes))
                   for parts in groups.values()])
    a = ad.AnnData(x.astype(np.float32), obs=pd.DataFrame({"condition": np.repeat(list(groups), 60)},
                                                          index=[f"c{i}" for i in range(len(x))]))
    a.var_names = [f"g{i}" for i in range(genes)]
    model = _tiny_model(a)
    control = a[(a.obs["condition"] == "ctrl").to_numpy()][:20].copy()
    for target, confidence in [("B", 0.5), ("C", 0.5), ("B+C", 0.5), ("A+B", 60 / 90)]:
        pred = scidiff.perturb(model, control, {"condition": target}, steps=2, progress=False, observed=False)
        np.testing.assert_allclose(pred.obs["scidiff_confidence"], confidence, rtol=1e-6, err_msg=target)
        change = np.asarray(pred.X).mean(0) - np.asarray(pred.layers["control"]).mean(0)
        own = sum(effect[s] for s in target.split("+")) > 0
        assert change[own].min() > 0.3 and change[~own].max() < 0.3, target


def test_a_baseline_target_joined_with_another_separator_says_so():
    """`scidiff predict --method additive --target condition=KLF1|GATA1` on `+` data said only
    "single perturbations without training cells: ['KLF1|GATA1']"; now it names the separator and
    what to write, as the model's refusal does."""
    from scidiff.evaluation.perturbation import predict_baseline

    train = _screen()
    control = train[(train.obs["condition"] == "ctrl").to_numpy()].copy()
    for method in ("additive", "mean-shift"):
        with pytest.raises(ValueError, match=r"joins perturbations of the training cells with '\|', but combinations "
                                             r"are read joined with '\+': write 'KLF1\+GATA1'"):
            predict_baseline(method, train, control, {"condition": "KLF1|GATA1"}, perturbation_key="condition",
                             control_label="ctrl")
