"""Perturbation predictions that generalise, against a known truth: combinations are additive
unless cross-validation over the seen ones says otherwise, and an effect carried to a context
where it was never seen moves that context's own cells, not toward the other contexts."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.models.effects import PerturbationEffects, choose_combination, group_changes, seen_group_means
from scidiff.models.shrinkage import adaptive_shrinkage
from scidiff.tasks.perturb import disagreement_shrinkage, perturb, transfer_evidence

G = 30


def _cells(groups, rng, noise=0.2, n=120):
    """``groups``: (context, perturbation label, mean [G]) -> an AnnData of ``n`` cells each."""
    xs, rows = [], []
    for context, label, mean in groups:
        xs.append(np.maximum(mean + noise * rng.normal(size=(n, G)), 0))
        rows += [(context, label)] * n
    obs = pd.DataFrame(rows, columns=["line", "perturbation"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=np.vstack(xs).astype(np.float32), obs=obs)
    adata.var_names = [f"g{i}" for i in range(G)]
    return adata


def _screen(rng, truth):
    """One context, singles A-F, three seen doubles; ``truth(u)`` maps the summed effect."""
    base = rng.uniform(2.0, 3.5, G)
    effect = {p: rng.normal(0, 0.8, G) * (rng.random(G) < 0.5) for p in "ABCDEF"}
    labels = ["control", *"ABCDEF", "A+B", "C+D", "E+F"]
    groups = [("l0", lab, base if lab == "control" else base + truth(sum(effect[p] for p in lab.split("+"))))
              for lab in labels]
    return _cells(groups, rng), effect, base


def _effects_report(adata):
    data = scidiff.setup_anndata(adata, n_top_genes=None, perturbation_keys=["perturbation"], scaling="none")
    eff = PerturbationEffects(["perturbation"], [])
    return eff.fit(data.x, data.covariates)["perturbation"], eff, data


def test_cross_validation_keeps_combinations_additive_on_an_additive_truth():
    for seed in range(3):
        report, eff, data = _effects_report(_screen(np.random.default_rng(seed), lambda u: u)[0])
        assert report["seen_combinations"] == 3 and report["cv_mse"] is not None
        assert report["combination"] == "additive", report
        w = torch.zeros(1, 6)
        w[0, :2] = 1.0
        assert torch.equal(eff.combination_term("perturbation", w), torch.zeros(1, G))


def test_cross_validation_takes_a_term_where_combinations_saturate():
    report, eff, data = _effects_report(_screen(np.random.default_rng(0), lambda u: 0.8 * np.tanh(u / 0.8))[0])
    assert report["combination"] in ("scaled", "polynomial")
    assert report["cv_mse"][report["combination"]] < 0.8 * report["cv_mse"]["additive"]


def test_single_effects_are_the_least_squares_fit_of_the_group_changes():
    adata, effect, base = _screen(np.random.default_rng(1), lambda u: u)
    report, eff, data = _effects_report(adata)
    vocab = data.spec.categorical["perturbation"]
    x, rows = data.x.double().numpy(), data.covariates["perturbation"][:, :-1].double().numpy()
    _, design, changes, counts, _ = group_changes(x, rows, np.zeros((len(x), 0), dtype=np.int64))
    expected = np.linalg.lstsq(np.sqrt(counts)[:, None] * design, np.sqrt(counts)[:, None] * changes, rcond=None)[0]
    np.testing.assert_allclose(eff.of("perturbation").single.numpy(), expected, atol=1e-4)
    # and they are close to the truth: 120 cells a group, noise 0.2 (clipped at 0)
    for p in "ABCDEF":
        assert np.abs(eff.of("perturbation").single[vocab.index(p)].numpy() - effect[p]).max() < 0.15


def test_one_seen_combination_cannot_be_cross_validated():
    design = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    changes = np.array([[1.0], [2.0], [2.5]])
    kind, coef, cv = choose_combination(design, changes, np.ones(3))
    assert kind == "additive" and cv is None and not coef.any()


@pytest.fixture(scope="module")
def decoy():
    """Three lines whose control cells differ a lot; P moves genes 0-9 by +1.5 in every line, but
    training sees P only in lines 1 and 2."""
    rng = np.random.default_rng(0)
    bases = [rng.uniform(1.0, 4.0, G) for _ in range(3)]
    effect = np.zeros(G)
    effect[:10] = 1.5
    groups = [(f"l{i}", "control", bases[i]) for i in range(3)]
    groups += [(f"l{i}", "P", bases[i] + effect) for i in (1, 2)]
    train = _cells(groups, rng)
    truth = _cells([("l0", "P", bases[0] + effect)], rng)
    model, control = _line_model(train)
    return train, truth, control, bases, effect, model


def _line_model(train):
    """A small model of cells with ``obs['line']`` and ``obs['perturbation']`` (60 epochs), and
    line 0's control cells."""
    torch.manual_seed(0)
    data = scidiff.setup_anndata(train, n_top_genes=None, condition_keys=["line"], perturbation_keys=["perturbation"],
                                 scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=64, num_layers=2, num_timesteps=100, latent_dim=8)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           learning_rate=2e-3, warmup_steps=20).train(60)
    line, pert = train.obs["line"].to_numpy(), train.obs["perturbation"].to_numpy()
    return model, train[(line == "l0") & (pert == "control")].copy()


def test_an_unseen_context_moves_its_own_cells_by_the_effect_learned_elsewhere(decoy):
    train, truth, control, bases, effect, model = decoy
    pred = perturb(model, control, {"perturbation": "P"}, steps=20, progress=False)
    assert (pred.obs["scidiff_route"] == "transferred").all()
    assert pred.uns["scidiff_prediction"]["transferred_from"] == {"line=l0": ["line=l1", "line=l2"]}
    change = pred.X.mean(0) - control.X.mean(0)
    # the predicted change is the effect (0.21 off with the network's per-cell deviation kept: its
    # reading of cells unlike any it saw under P, as line 0's are unlike lines 1 and 2)
    assert np.sqrt(np.mean((change - effect) ** 2)) < 0.05
    assert pred.uns["scidiff_prediction"]["transferred_inside"] == {"line=l0": {"line=l1": 0.0, "line=l2": 0.0}}
    # ... and does not follow the other lines' difference of controls
    decoy_shift = (bases[1] + bases[2]) / 2 - bases[0]
    assert abs(np.corrcoef(change, decoy_shift)[0, 1]) < 0.3
    # every predicted cell's nearest real perturbed cell is one of its own line
    real = np.vstack([truth.X, train[train.obs["perturbation"].to_numpy() == "P"].X])
    own = np.r_[np.ones(truth.n_obs, bool), np.zeros(real.shape[0] - truth.n_obs, bool)]
    nearest = ((pred.X[:, None, :] - real[None]) ** 2).sum(-1).argmin(1)
    assert own[nearest].mean() > 0.95
    # the two lines agree on the effect: the confidence is their 120 training cells each, 120 / 150
    np.testing.assert_allclose(pred.obs["scidiff_confidence"].to_numpy(), 0.8, atol=1e-6)


def test_the_predict_summary_says_a_new_line_lies_outside_the_lines_read(decoy, tmp_path):
    from scidiff.cli.predict import what_predictions_rest_on
    from scidiff.tasks.screen import predict_screen_to_file

    train, truth, control, bases, effect, model = decoy
    out = tmp_path / "pred.h5ad"
    predict_screen_to_file(model, control, [{"perturbation": "P"}, {"perturbation": "control"}], out, steps=20,
                           progress=False)
    said = what_predictions_rest_on(str(out))
    assert said[1] == "  perturbation=P: transferred, confidence 0.80; inside the contexts read: line=l1 0.00, line=l2 0.00"
    assert said[2] == "  perturbation=control: control, confidence 1.00"  # the cells as they are


def test_a_knockout_within_the_noise_of_every_context_transfers_as_no_change():
    """Three alike lines (replicates); Q changes nothing and was seen, with 25 cells, in lines 1
    and 2 only. Read in those lines, the network's change follows Q's training noise; centred on
    each line's shrunk estimate (zero here), the prediction for line 0 is no change."""
    rng = np.random.default_rng(0)
    common = rng.uniform(1.0, 4.0, G)
    bases = [common + 0.1 * rng.normal(size=G) for _ in range(3)]
    train = ad.concat([_cells([(f"l{i}", "control", bases[i]) for i in range(3)], rng),
                       _cells([(f"l{i}", "Q", bases[i]) for i in (1, 2)], rng, n=25)])
    train.obs_names = [f"c{i}" for i in range(train.n_obs)]
    model, control = _line_model(train)
    line, pert = train.obs["line"].to_numpy(), train.obs["perturbation"].to_numpy()
    noise = np.mean([train[(line == li) & (pert == "Q")].X.mean(0) - train[(line == li) & (pert == "control")].X.mean(0)
                     for li in ("l1", "l2")], 0)
    pred = perturb(model, control, {"perturbation": "Q"}, steps=20, progress=False)
    assert (pred.obs["scidiff_route"] == "transferred").all()
    change = pred.X.mean(0) - control.X.mean(0)
    # uncentred, the change was Q's training noise (correlation 0.96, the same size, confidence 0.997)
    assert np.sqrt(np.mean(change**2)) < 0.25 * np.sqrt(np.mean(noise**2))
    assert not change.any() or np.corrcoef(change, noise)[0, 1] < 0.5  # exactly no change has no correlation
    assert (pred.obs["scidiff_confidence"] <= 25 / 55 + 1e-6).all()  # 25 training cells in each line read


def test_a_seen_context_reads_the_change_in_that_context(decoy):
    train, truth, control, bases, effect, model = decoy
    line1 = train[(train.obs["line"] == "l1").to_numpy() & (train.obs["perturbation"] == "control").to_numpy()].copy()
    pred = perturb(model, line1, {"perturbation": "P"}, steps=20, progress=False)
    assert (pred.obs["scidiff_route"] == "seen").all()
    assert np.sqrt(np.mean((pred.X.mean(0) - line1.X.mean(0) - effect) ** 2)) < 0.25
    assert 0.75 < pred.obs["scidiff_confidence"].iloc[0] < 1  # 120 training cells: 120 / 150
    # the cells' mean change is the group's estimated mean change (the network only spreads it);
    # these cells are the context's reference cells, and the offset does not depend on batching
    again = perturb(model, line1, {"perturbation": "P"}, steps=20, progress=False, batch_size=7)
    np.testing.assert_allclose(again.X, pred.X, atol=1e-5)
    vocab = model.data_spec.categorical
    mean = model.effects.seen_change("perturbation", [vocab["perturbation"].index("P")], [vocab["line"].index("l1")])
    shifted = perturb(model, line1, {"perturbation": "P"}, steps=20, progress=False, observed=False)
    np.testing.assert_allclose(shifted.X.mean(0) - line1.X.mean(0), mean.numpy(), atol=1e-3)


def test_a_screen_without_contexts_centres_seen_singles_on_their_estimate():
    """One context (no covariate beside the perturbation): each seen single of an unseen double
    moves the reference control cells by its estimated mean change, so their mean change is the
    sum of the two estimates (the screen is additive: no combination term)."""
    adata, _, _ = _screen(np.random.default_rng(2), lambda u: u)
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, perturbation_keys=["perturbation"], scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=8)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           learning_rate=2e-3, warmup_steps=20).train(5)
    control = adata[(adata.obs["perturbation"] == "control").to_numpy()].copy()  # all of them are the reference
    pred = perturb(model, control, {"perturbation": "A+C"}, steps=10, progress=False, observed=False)
    assert (pred.obs["scidiff_route"] == "additive").all()
    vocab = model.data_spec.categorical["perturbation"]
    expected = sum(model.effects.seen_change("perturbation", [vocab.index(p)], []) for p in "AC")
    np.testing.assert_allclose(pred.X.mean(0) - control.X.mean(0), expected.numpy(), atol=1e-3)


def test_adaptive_shrinkage_sets_noise_to_zero_and_keeps_measured_changes():
    rng = np.random.default_rng(0)
    s2 = np.full(2000, 0.1**2)
    null = rng.normal(0, 0.1, 2000)  # a knockout that changes nothing
    kept = adaptive_shrinkage(null, s2)
    assert np.sum(kept**2) < 0.01 * np.sum(null**2)  # 99% of its (noise) change removed
    truth = np.where(rng.random(2000) < 0.05, rng.normal(0, 1.0, 2000), 0.0)  # a few genes change
    d = truth + rng.normal(0, 0.1, 2000)
    post = adaptive_shrinkage(np.stack([d, null]), np.stack([s2, s2]))[0]
    assert np.mean((post - truth) ** 2) < 0.4 * np.mean((d - truth) ** 2)
    strong = np.abs(truth) > 0.5
    assert np.abs(post[strong] - d[strong]).max() < 0.1 * np.abs(d[strong]).min()


def test_seen_group_means_pool_agreeing_contexts_and_keep_a_real_difference():
    rng = np.random.default_rng(1)
    g, n = 400, 50
    e_p = np.where(rng.random(g) < 0.1, rng.normal(0, 1.0, g), 0.0)  # P: the same in both contexts
    e_q = np.where(rng.random(g) < 0.1, 1.5, 0.0)  # Q: opposite in the two contexts
    truth = np.stack([e_p, e_p, e_q, -e_q])
    design = np.array([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])  # Q in context 2 is its own column
    design[3] = [0, 1, 0]
    se2 = np.full((4, g), 2 * 0.5**2 / n)  # cell sd 0.5, n cells and n controls
    changes = truth + rng.normal(0, np.sqrt(se2))
    means = seen_group_means(design, changes, np.full(4, float(n)), se2)
    assert np.mean((means - truth) ** 2) < 0.5 * np.mean((changes - truth) ** 2)
    assert np.abs(means[0] - means[1]).max() < 0.05  # agreeing contexts share one estimate
    on = e_q != 0
    assert (np.sign(means[2][on]) == 1).all() and (np.sign(means[3][on]) == -1).all()  # a real difference kept


def test_context_support_is_one_inside_a_contexts_cells_and_zero_far_outside():
    rng = np.random.default_rng(0)
    eff = PerturbationEffects(["perturbation"], ["line"])
    eff.reference_latent = torch.as_tensor(rng.normal(size=(256, 8)), dtype=torch.float32)
    eff.reference_context = torch.zeros(256, 1, dtype=torch.long)
    inside = eff.context_support(torch.as_tensor(rng.normal(size=(200, 8)), dtype=torch.float32), [0])
    assert inside.median() == 1.0 and (inside > 0).mean(dtype=torch.float32) > 0.95
    far = torch.as_tensor(rng.normal(size=(200, 8)) + 6.0, dtype=torch.float32)  # 17 sd away
    assert torch.equal(eff.context_support(far, [0]), torch.zeros(200))
    # the edge: at the 95th percentile of the reference cells' own 10-nearest distance, support 1;
    # at twice it, 0 (a point on a ray out of the cloud, found by bisection on its distance)
    d = torch.cdist(eff.reference_latent, eff.reference_latent)
    d.fill_diagonal_(float("inf"))
    q = float(torch.quantile(d.topk(10, largest=False).values.mean(1), 0.95))
    ray = torch.zeros(1, 8)
    ray[0, 0] = 1.0

    def at(target):
        lo, hi = 0.0, 50.0
        for _ in range(60):
            mid = (lo + hi) / 2
            rho = torch.cdist(mid * ray, eff.reference_latent).topk(10, largest=False).values.mean()
            lo, hi = (mid, hi) if rho < target else (lo, mid)
        return lo * ray

    assert abs(float(eff.context_support(at(1.5 * q), [0])) - 0.5) < 1e-3
    assert torch.equal(eff.context_support(torch.zeros(0, 8), [1]), torch.ones(0))  # no reference cells: 1


def test_transfer_evidence_closed_forms():
    d = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two contexts, one cell, orthogonal changes of one size
    outside, half = torch.tensor([0.0]), torch.tensor([0.5])
    assert torch.allclose(transfer_evidence(d, outside), torch.tensor([0.5]))  # |(1/2, 1/2)|^2 / 1
    assert torch.allclose(transfer_evidence(d, half), torch.tensor([0.75]))
    assert torch.equal(transfer_evidence(d, torch.tensor([1.0])), torch.tensor([1.0]))  # within a context read
    assert torch.equal(transfer_evidence(torch.stack([d[0], d[0]]), outside), torch.tensor([1.0]))  # alike
    assert torch.equal(transfer_evidence(torch.stack([d[0], -d[0]]), outside), torch.tensor([0.0]))  # opposite
    assert torch.equal(transfer_evidence(torch.zeros(3, 1, 2), outside), torch.tensor([1.0]))  # no change anywhere
    assert torch.equal(transfer_evidence(d[:1], outside), torch.tensor([0.0]))  # one context cannot tell


def test_a_change_seen_in_one_line_states_no_confidence_for_a_line_unlike_it(decoy):
    """P seen in line 1 alone: line 0's cells, unlike line 1's, take its mean change, and nothing in
    the data says that carries (with lines 1 and 2 agreeing, the decoy states 0.8)."""
    train = decoy[0]
    line, pert = train.obs["line"].to_numpy(), train.obs["perturbation"].to_numpy()
    model, control = _line_model(train[~((line == "l2") & (pert == "P"))].copy())
    pred = perturb(model, control, {"perturbation": "P"}, steps=20, progress=False)
    assert pred.uns["scidiff_prediction"]["transferred_inside"] == {"line=l0": {"line=l1": 0.0}}
    assert (pred.obs["scidiff_confidence"] < 0.05).all()
    change = pred.X.mean(0) - control.X.mean(0)
    assert np.sqrt(np.mean((change - decoy[4]) ** 2)) < 0.1  # the prediction itself is line 1's effect


def test_disagreement_shrinkage_is_positive_part_james_stein():
    d = torch.tensor([[[3.0, 0.0]], [[1.0, 0.0]]])  # two contexts, one cell: mean (2, 0), se^2 = 1
    assert torch.allclose(disagreement_shrinkage(d), torch.tensor([0.75]))
    assert torch.equal(disagreement_shrinkage(torch.stack([d[0], d[0]])), torch.tensor([1.0]))  # agree
    assert torch.equal(disagreement_shrinkage(torch.stack([d[0], -d[0]])), torch.tensor([0.0]))  # cancel
    assert torch.equal(disagreement_shrinkage(d[:1]), torch.tensor([1.0]))  # one context shows nothing



def test_a_knockdown_of_sparse_genes_keeps_its_predicted_mean_at_the_floor_of_zero():
    """Sparse genes (expressed in 40% of control cells) halved by a seen knockdown, predicted as
    shifted cells (``observed=False``; the measured ones: tests/test_measured_change.py): clipping the
    moved cells at zero would leave their mean far above the prediction (cells that do not express
    a gene cannot lose it); the floor scales the expressing cells instead, so every cell stays
    >= 0, the predicted mean change is the model's estimate (its seen change) and batching does
    not change a cell."""
    rng = np.random.default_rng(5)
    n = 240
    sparse = np.arange(G) < 10
    base = np.where(sparse, 0.0, 2.5)

    def cells(rate):
        on = rng.random((n, G)) < rate
        x = np.where(sparse, on * (2.0 + 0.2 * rng.normal(size=(n, G))), base + 0.2 * rng.normal(size=(n, G)))
        return np.maximum(x, 0)

    x = np.vstack([cells(0.4), cells(0.2)]).astype(np.float32)
    obs = pd.DataFrame({"perturbation": ["control"] * n + ["KD"] * n}, index=[f"c{i}" for i in range(2 * n)])
    adata = ad.AnnData(X=x, obs=obs)
    adata.var_names = [f"g{i}" for i in range(G)]
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, perturbation_keys=["perturbation"], scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=8)
    scidiff.ScIDiffTrainer(model, data.loader(128), device="cpu", progress=False, early_stopping_patience=None,
                           learning_rate=2e-3, warmup_steps=20).train(3)
    control = adata[:n].copy()
    pred = perturb(model, control, {"perturbation": "KD"}, steps=10, progress=False, observed=False)
    assert (pred.obs["scidiff_route"] == "seen").all() and float(pred.X.min()) >= 0
    vocab = model.data_spec.categorical["perturbation"]
    change = model.effects.seen_change("perturbation", [vocab.index("KD")], []).numpy()
    assert (change[sparse] < -0.2).all()  # the knockdown lowers every sparse gene by about 0.4
    got = pred.X.mean(0) - control.X.mean(0)
    np.testing.assert_allclose(got[sparse], change[sparse], atol=0.03)
    clipped = np.maximum(pred.layers["control"] + change, 0).mean(0) - control.X.mean(0)
    assert (clipped[sparse] - change[sparse] > 0.1).all()  # what a plain clip would predict instead
    halves = [perturb(model, control[i:i + n // 2].copy(), {"perturbation": "KD"}, steps=10, progress=False,
                      batch_size=37, observed=False).X for i in (0, n // 2)]
    np.testing.assert_allclose(np.vstack(halves), pred.X, atol=1e-5)


def test_a_prediction_that_names_another_context_states_that_groups_support(kang_small):
    """Asking control cells of one cell type for another type's stimulated cells is decoded under
    the target itself (route ``direct``); its confidence is the training cells of the group asked
    for, ``n / (n + 30)``, counted from the data."""
    data = scidiff.setup_anndata(kang_small, n_top_genes=50, condition_keys=["cell_type"],
                                 perturbation_keys=["condition"], control_labels=["control"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=20, latent_dim=8)
    obs = kang_small.obs
    source = kang_small[((obs["cell_type"] == "CD4T") & (obs["condition"] == "control")).to_numpy()][:6].copy()
    pred = perturb(model, source, {"cell_type": "B", "condition": "stimulated"}, steps=4, progress=False)
    n = float(((obs["cell_type"] == "B") & (obs["condition"] == "stimulated")).sum())
    assert pred.obs["scidiff_route"].astype(str).eq("direct").all() and n > 0
    np.testing.assert_allclose(pred.obs["scidiff_confidence"].to_numpy(), n / (n + 30), rtol=1e-6)
