"""The perturbation prior (unseen perturbations from prior knowledge): the ridge map recovers a
linear truth and switches itself off on noise; drug fingerprints from SMILES; user tables; gene
targets described by the data itself (Papalexi: 9 of 25 targets in its 299-gene panel); the
prior inside model.pt; `scidiff train` fits it and records its cross-validation."""
import json

import numpy as np
import pytest
import torch

from scidiff.data import setup_anndata
from scidiff.data.perturbation_features import (FeatureBlock, FeatureTable, build_feature_tables, labels_are_genes,
                                                morgan_fingerprints, read_feature_tsv)
from scidiff.models.perturbation_prior import PerturbationPrior
from scidiff.training.checkpoint import load_model, save_model

from shared_data import shared_file


SCIPLEX = "sciplex_drugs_smiles.csv"


def _linear_screen(noise_features: bool, seed: int = 0, k: int = 60, p: int = 20, g: int = 50):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(k, p))
    effects = features @ (0.3 * rng.normal(size=(p, g))) + 0.05 * rng.normal(size=(k, g))
    if noise_features:
        effects = rng.normal(size=(k, g))
    labels = [f"drug{i}" for i in range(k)]
    table = FeatureTable("drug", [FeatureBlock("user", "features.tsv", labels, features)])
    return labels, effects, table, [f"g{i}" for i in range(g)]


def test_ridge_prior_recovers_held_out_perturbations_of_a_linear_truth():
    labels, effects, table, genes = _linear_screen(noise_features=False)
    seen = {lab: effects[i] for i, lab in enumerate(labels[:50])}
    prior = PerturbationPrior.fit(genes, {"drug": seen}, {"drug": table})
    report = prior.report()["drug"]
    assert report["cv_r2"] > 0.9 and report["shrink"] > 0.9 and report["n_fit"] == 50
    held = effects[50:]
    pred = np.stack([prior.predict("drug", lab)[0] for lab in labels[50:]])
    r2 = 1 - ((pred - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert r2 > 0.9
    delta, confidence = prior.effect("drug", labels[55])
    assert delta.dtype == torch.float32 and delta.shape == (len(genes),) and 0.9 < confidence <= 1.0
    assert prior.effect("drug", labels[3])[1] == 1.0  # seen: its measured effect
    assert prior.predict("drug", "control")[1] == 1.0 and not prior.predict("drug", "control")[0].any()
    combo, conf, info = prior.predict("drug", f"{labels[3]}+{labels[55]}")  # a sum of singles
    np.testing.assert_allclose(combo, effects[3] + prior.predict("drug", labels[55])[0])
    assert info["route"] == "sum of singles" and conf == pytest.approx(confidence)
    assert "CV" in prior.summary() and "R2" in prior.summary()


def test_noise_features_give_no_change_with_confidence_zero():
    labels, effects, table, genes = _linear_screen(noise_features=True)
    prior = PerturbationPrior.fit(genes, {"drug": {lab: effects[i] for i, lab in enumerate(labels[:50])}},
                                  {"drug": table})
    report = prior.report()["drug"]
    assert report["shrink"] == 0.0 and report["cv_r2"] == 0.0
    for lab in labels[50:]:
        delta, confidence = prior.effect("drug", lab)
        assert confidence == 0.0 and not delta.any()
    assert "no change" in prior.describe("drug", labels[51])["route"]


def test_unknown_labels_and_keys_are_refused_by_name():
    labels, effects, table, genes = _linear_screen(noise_features=False)
    prior = PerturbationPrior.fit(genes, {"drug": {lab: effects[i] for i, lab in enumerate(labels[:50])}},
                                  {"drug": table})
    with pytest.raises(ValueError, match=r"no prior knowledge of perturbation 'aspirin'.*features\.tsv"):
        prior.effect("drug", "aspirin")
    with pytest.raises(ValueError, match="covariate 'dose'"):
        prior.effect("dose", labels[0])


def test_smiles_become_deterministic_morgan_bits_and_bad_rows_are_named(tmp_path):
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install 'scidiff[chem]')")
    path = shared_file(SCIPLEX)
    block = morgan_fingerprints(path)
    assert block.values.shape == (188, 2048)  # 189 rows, 'control' listed twice alike and set(np.unique(block.values)) <= {0.0, 1.0}
    first = block.values[block.index_of("2-Methoxyestradiol")]
    second = block.values[block.index_of("A-366")]
    assert first.sum() == 44 and np.flatnonzero(first)[:8].tolist() == [40, 105, 249, 408, 455, 519, 562, 614]
    assert second.sum() == 46 and np.flatnonzero(second)[:8].tolist() == [13, 80, 249, 378, 440, 534, 653, 695]
    np.testing.assert_array_equal(morgan_fingerprints(path).values, block.values)
    assert block.index_of("a-366") == block.index_of("A-366")  # case-insensitive when unambiguous
    bad = tmp_path / "drugs.csv"
    bad.write_text("name,smiles\naspirin,CC(=O)Oc1ccccc1C(=O)O\nbroken,C1CC(\n")
    with pytest.raises(ValueError, match=r"drugs\.csv: line 3 \('broken'\): RDKit cannot parse"):
        morgan_fingerprints(bad)
    bad.write_text("aspirin,CC(=O)Oc1ccccc1C(=O)O\naspirin,CCO\n")
    with pytest.raises(ValueError, match="line 2: drug 'aspirin' already given on line 1 with another SMILES"):
        morgan_fingerprints(bad)


def test_user_feature_tables_are_read_and_errors_name_line_and_column(tmp_path):
    path = tmp_path / "emb.tsv"
    path.write_text("gene\te1\te2\nSTAT1\t0.5\t-1\nIRF1\t2\t3e-1\n")
    block = read_feature_tsv(path)
    assert block.labels == ["STAT1", "IRF1"] and block.columns == ["e1", "e2"]
    np.testing.assert_allclose(block.values, [[0.5, -1], [2, 0.3]])
    for text, match in [("gene\te1\nSTAT1\tabc\n", r"line 2 \('STAT1'\), column 'e1': 'abc' is not a number"),
                        ("gene\te1\nSTAT1\t1\nSTAT1\t2\n", "line 3: label 'STAT1' already given on line 2"),
                        ("gene\te1\te2\nSTAT1\t1\n", r"line 2 \('STAT1'\) has 1 values for 2"),
                        ("gene,e1\nSTAT1,1\n", "names no feature column"),
                        ("gene\te1\nSTAT1\tnan\n", "not finite")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_feature_tsv(path)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_feature_tsv(tmp_path / "missing.tsv")


@pytest.fixture(scope="module")
def papalexi():
    """Papalexi cells with grna_frac_top >= 0.8, 4,000 of them (all 25 targets, the 299-gene panel)."""
    import anndata as ad

    a = ad.read_h5ad(shared_file("papalexi21_thp1_sceptre_lowmoi.h5ad"))
    a = a[a.obs["grna_frac_top"].to_numpy() >= 0.8]
    keep = np.sort(np.random.default_rng(0).choice(a.n_obs, 4000, replace=False))
    a = a[keep].copy()
    a.obs = a.obs[["perturbation", "bio_rep"]].astype(str)
    return a


def test_gene_targets_are_described_by_the_data_itself(papalexi, tmp_path):
    cells = setup_anndata(papalexi, n_top_genes=None, condition_keys=["bio_rep"], perturbation_keys=["perturbation"],
                          control_labels=["control"], scaling="none")
    targets = cells.spec.categorical["perturbation"]
    genes = list(cells.spec.gene_names)
    assert len(targets) == 25 and len(genes) == 299 and labels_are_genes(targets, genes)
    control = cells.covariates["perturbation"].numpy().sum(1) == 0
    table = build_feature_tables(papalexi, cells.spec, {"perturbation": targets}, control)["perturbation"]
    assert table.gene_targets and [b.name for b in table.blocks] == ["coexpression", "pca_loadings", "in_model_genes"]
    described = [t for t in targets if table.describes(t)]
    assert len(described) == 9 and set(described) == set(targets) & set(genes)
    coexpression = table.rows("STAT1")["coexpression"]
    assert coexpression.shape == (299,) and coexpression[genes.index("STAT1")] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.abs(coexpression) <= 1 + 1e-6) and table.rows("STAT1")["pca_loadings"].shape == (10,)
    assert all(table.describes(g) for g in genes)  # any panel gene is a possible (unseen) target
    prior = PerturbationPrior.from_cells(cells, papalexi)
    report = prior.report()["perturbation"]
    assert report["n_seen"] == 25 and report["n_fit"] == 9 and report["self"]["n_targets"] == 9
    assert report["cv_mse"] <= report["cv_mse_no_change"]
    assert prior.describe("perturbation", "IRF1")["route"] == "measured"  # seen, though not a panel gene
    with pytest.raises(ValueError, match=r"no prior knowledge of perturbation 'NOT_A_GENE'"):
        prior.effect("perturbation", "IRF1+NOT_A_GENE")
    unseen = next(g for g in genes if g not in targets)
    delta, confidence = prior.effect("perturbation", unseen)
    assert delta.shape == (299,) and 0.0 <= confidence <= 1.0
    # a model on fewer genes still describes every measured gene as a target (the table is small)
    few = setup_anndata(papalexi, n_top_genes=100, condition_keys=["bio_rep"], perturbation_keys=["perturbation"],
                        control_labels=["control"], scaling="none")
    outside = next(g for g in genes if g not in few.spec.gene_names and g not in targets)
    small = PerturbationPrior.from_cells(few, papalexi)
    assert small.describe("perturbation", outside)["blocks"] == ["coexpression", "in_model_genes", "pca_loadings"]
    assert small.effect("perturbation", outside)[0].shape == (100,)
    # a user table adds a label the panel does not measure
    tsv = tmp_path / "emb.tsv"
    tsv.write_text("label\te1\te2\n" + "".join(f"{t}\t{i % 3}\t{i % 5}\n" for i, t in enumerate(targets + ["CD274X"])))
    with_user = PerturbationPrior.from_cells(cells, papalexi, perturbation_features=str(tsv))
    assert with_user.keys["perturbation"].table.describes("CD274X")
    assert with_user.report()["perturbation"]["n_fit"] == 25
    assert 0.0 <= with_user.effect("perturbation", "CD274X")[1] <= 1.0


def test_the_prior_travels_inside_model_pt(tmp_path):
    from training_helpers import synthetic_cells, tiny_model

    model = tiny_model(synthetic_cells(genes=50))
    labels, effects, table, genes = _linear_screen(noise_features=False)
    model.perturbation_prior = PerturbationPrior.fit(genes, {"drug": {lab: effects[i] for i, lab in
                                                                      enumerate(labels[:50])}}, {"drug": table})
    path = save_model(model, tmp_path)
    raw = torch.load(path, weights_only=True)  # tensors and plain values only
    assert raw["perturbation_prior"]["format"] == "scidiff.perturbation_prior"
    loaded = load_model(path).perturbation_prior
    for lab in (labels[52], labels[7]):
        (a, ca), (b, cb) = model.perturbation_prior.effect("drug", lab), loaded.effect("drug", lab)
        assert torch.equal(a, b) and ca == cb
    assert loaded.report() == model.perturbation_prior.report()
    model.perturbation_prior = None
    assert load_model(save_model(model, tmp_path / "plain.pt")).perturbation_prior is None


def test_scidiff_train_fits_the_prior_and_records_its_cross_validation(papalexi, tmp_path, capsys):
    from scidiff.cli import main

    data = tmp_path / "papalexi.h5ad"
    papalexi[:1500].copy().write_h5ad(data)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {hidden_dim: 32, num_layers: 2, num_timesteps: 50, conditioning_dim: 16, latent_dim: 8}\n"
                      "training: {batch_size: 256, warmup_steps: 2, checkpoint_every: 0}\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--config", str(config), "--epochs", "1",
                 "--condition-keys", "bio_rep", "--perturbation-keys", "perturbation", "--control-labels",
                 "control"]) == 0
    printed = capsys.readouterr().out
    assert "perturbation prior for 'perturbation'" in printed and "perturbation effects (perturbation): " in printed
    summary = json.loads((out / "training.json").read_text())
    effects = summary["perturbation_effects"]["perturbation"]  # Papalexi: singles only, nothing to cross-validate
    assert effects["combination"] == "additive" and effects["seen_combinations"] == 0 and effects["cv_mse"] is None
    assert effects["singles_seen"] == len(load_model(out).data_spec.categorical["perturbation"]) == 25
    report = summary["perturbation_prior"]
    assert report["fitted"] and report["perturbation"]["n_fit"] >= 1 and "cv_r2" in report["perturbation"]
    prior = load_model(out).perturbation_prior
    assert prior is not None and prior.report()["perturbation"]["cv_r2"] == report["perturbation"]["cv_r2"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r2"), "--config", str(config), "--epochs",
                 "1", "--perturbation-features", str(tmp_path / "none.tsv")]) == 2
    assert "--perturbation-keys" in capsys.readouterr().err
    keys = ["--perturbation-keys", "perturbation", "--control-labels", "control"]
    for text, named in [("label\te1\nSTAT1\tx\n", "line 2 ('STAT1'), column 'e1'"),
                        ("label\te1\nnothing_seen\t1\n", "describes none of the perturbations seen in training")]:
        (tmp_path / "bad.tsv").write_text(text)
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "r3"), "--config", str(config), "--epochs",
                     "1", *keys, "--perturbation-features", str(tmp_path / "bad.tsv")]) == 2
        err = capsys.readouterr().err
        assert "bad.tsv" in err and named in err and not (tmp_path / "r3").exists()


TINY = ("model: {hidden_dim: 32, num_layers: 2, num_timesteps: 50, conditioning_dim: 16, latent_dim: 8}\n"
        "training: {batch_size: 256, warmup_steps: 2, checkpoint_every: 0}\n")


def _predict_unseen(tmp_path, capsys, run, cells, key, label):
    """``scidiff predict --shifted`` of ``label`` (never seen) for ``cells``: the output, and the
    model's prior; the default (measured cells) checked against it: the same cells' zeros, the
    same mean change within sampling."""
    from scidiff.cli import main

    control = tmp_path / "control.h5ad"
    cells.write_h5ad(control)
    out, measured = tmp_path / f"{label}.h5ad", tmp_path / f"{label}_measured.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(control), "--target", f"{key}={label}",
                 "--out", str(out), "--shifted"]) == 0, capsys.readouterr().err
    assert "(shifted cells, --shifted)" in capsys.readouterr().out
    assert main(["predict", "--model", str(run), "--data", str(control), "--target", f"{key}={label}",
                 "--out", str(measured)]) == 0, capsys.readouterr().err
    assert "(measured cells)" in capsys.readouterr().out
    import anndata as ad

    shifted, observed = ad.read_h5ad(out), ad.read_h5ad(measured)
    assert not shifted.uns["scidiff_prediction"]["observed"] and observed.uns["scidiff_prediction"]["observed"]
    x, c = np.asarray(observed.X), np.asarray(cells.X.toarray() if hasattr(cells.X, "toarray") else cells.X)
    assert abs(float((x > 0).mean() - (c > 0).mean())) < 0.05  # as sparse as the cells
    se = np.asarray(shifted.X).std(0) / len(c) ** 0.5
    assert np.mean(np.abs(x.mean(0) - np.asarray(shifted.X).mean(0)) < 4 * se + 0.02) > 0.95
    return shifted, load_model(run).perturbation_prior


def _check_prior_prediction(pred, prior, key, label):
    """The prediction is each cell moved by the prior's effect (expression floored at 0), its route
    and confidence the prior's."""
    effect, confidence, _ = prior.predict(key, label)
    assert (pred.obs["scidiff_route"] == "prior").all()
    np.testing.assert_allclose(pred.obs["scidiff_confidence"].to_numpy(), confidence, rtol=1e-6)
    assert 0 <= confidence <= 1
    control = np.asarray(pred.layers["control"])
    np.testing.assert_allclose(np.asarray(pred.X), np.maximum(control + effect, 0), atol=2e-4)
    return effect, confidence


def test_an_unseen_gene_target_end_to_end_through_the_command_line(papalexi, tmp_path, capsys):
    """STAT1 (a panel gene) never seen: trained without its cells, predicted from the data's own
    description of it; TP53 (neither measured nor in the screen: nothing describes it) is refused by name."""
    from scidiff.cli import main

    pert = papalexi.obs["perturbation"].to_numpy()
    data = tmp_path / "train.h5ad"
    papalexi[pert != "STAT1"].copy().write_h5ad(data)
    (tmp_path / "tiny.yaml").write_text(TINY)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--config", str(tmp_path / "tiny.yaml"),
                 "--epochs", "1", "--perturbation-keys", "perturbation", "--control-labels", "control"]) == 0
    capsys.readouterr()
    pred, prior = _predict_unseen(tmp_path, capsys, run, papalexi[pert == "control"][:64].copy(), "perturbation",
                                  "STAT1")
    effect, _ = _check_prior_prediction(pred, prior, "perturbation", "STAT1")
    assert np.abs(effect).max() > 0  # the self-effect on STAT1 at least
    assert (pred.obs["perturbation"] == "STAT1").all()
    assert "TP53" not in set(papalexi.var_names) | set(pert)
    assert main(["predict", "--model", str(run), "--data", str(tmp_path / "control.h5ad"), "--target",
                 "perturbation=TP53", "--out", str(tmp_path / "tp53.h5ad")]) == 2
    assert "'TP53'" in capsys.readouterr().err and not (tmp_path / "tp53.h5ad").exists()
    # cells are drawn only under seen perturbations: the refusal says how to predict the unseen one
    assert main(["sample", "--model", str(run), "-n", "4", "--condition", "perturbation=STAT1", "--out",
                 str(tmp_path / "s.h5ad")]) == 2
    assert "the model's prior describes ['STAT1']: predict control cells under it with scidiff predict " \
           "--target perturbation=STAT1" in capsys.readouterr().err

    # GEARS' spelling of the unseen single (STAT1+control), and a combination of a seen single with
    # the unseen one: the seen change plus the prior's effect; each label written as asked for
    targets = ["STAT1+control", "IRF1", "STAT1+IRF1"]
    screen = tmp_path / "screen.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(tmp_path / "control.h5ad"), "--out", str(screen),
                 "--shifted", *[a for t in targets for a in ("--target", f"perturbation={t}")]]) == 0, \
        capsys.readouterr().err
    import anndata as ad

    out = ad.read_h5ad(screen)
    part = {t: out[out.obs["scidiff_target"] == f"perturbation={t}"] for t in targets}
    assert [part[t].obs["scidiff_route"].unique().tolist() for t in targets] == [["prior"], ["seen"], ["seen+prior"]]
    assert all((part[t].obs["perturbation"] == t).all() for t in targets)
    np.testing.assert_allclose(np.asarray(part["STAT1+control"].X), np.asarray(pred.X), atol=1e-6)
    np.testing.assert_allclose(part["STAT1+IRF1"].obs["scidiff_confidence"], min(
        float(part["IRF1"].obs["scidiff_confidence"].iloc[0]), prior.predict("perturbation", "STAT1")[1]), rtol=1e-6)
    # where neither prediction sits at the floor at zero (and IRF1's mean change does not lower the
    # gene, so the seen route's mean-keeping scale is 1), the two differ by the prior's effect
    alone, both = np.asarray(part["IRF1"].X), np.asarray(part["STAT1+IRF1"].X)
    clear = (alone > 0) & (both > 0) & ((alone - np.asarray(pred.layers["control"])).mean(0) >= 0)
    assert clear.sum() > 1000 and clear[:, effect != 0].any()
    np.testing.assert_allclose((both - alone)[clear], np.broadcast_to(effect, both.shape)[clear], atol=1e-4)


def test_an_unseen_drug_from_its_smiles_end_to_end_through_the_command_line(tmp_path, capsys):
    """Ten sci-Plex drugs seen, an eleventh predicted from its SMILES alone (Morgan fingerprints)."""
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install 'scidiff[chem]')")
    import anndata as ad
    import pandas as pd

    from scidiff.cli import main

    smiles = shared_file(SCIPLEX)
    drugs = pd.read_csv(smiles, header=None)[0].drop_duplicates().tolist()[:11]
    rng = np.random.default_rng(0)
    genes, n = 40, 60
    base = rng.uniform(5, 30, genes)
    direction = rng.normal(size=genes)
    labels, counts = [], []
    for i, drug in enumerate(["control"] + drugs[:10]):
        scale = np.exp(0.4 * (i % 3) * direction) if drug != "control" else 1.0
        counts.append(rng.poisson(base * scale, (n, genes)))
        labels += [drug] * n
    cells = ad.AnnData(X=np.vstack(counts).astype(np.float32),
                       obs=pd.DataFrame({"drug": labels}, index=[f"c{i}" for i in range(len(labels))]))
    cells.var_names = [f"g{i}" for i in range(genes)]
    data = tmp_path / "train.h5ad"
    cells.write_h5ad(data)
    (tmp_path / "tiny.yaml").write_text(TINY)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--config", str(tmp_path / "tiny.yaml"),
                 "--epochs", "1", "--perturbation-keys", "drug", "--control-labels", "control",
                 "--smiles", smiles]) == 0
    assert "perturbation prior for 'drug'" in capsys.readouterr().out
    pred, prior = _predict_unseen(tmp_path, capsys, run, cells[:n].copy(), "drug", drugs[10])
    _check_prior_prediction(pred, prior, "drug", drugs[10])
    assert (pred.obs["drug"] == drugs[10]).all()
    assert main(["predict", "--model", str(run), "--data", str(tmp_path / "control.h5ad"), "--target",
                 "drug=not-a-drug", "--out", str(tmp_path / "none.h5ad")]) == 2
    assert "'not-a-drug'" in capsys.readouterr().err


DOSES = (10.0, 100.0, 1000.0, 10000.0)


def _dosed_screen(dose_matters: bool, k: int = 40, p: int = 12, g: int = 50, seed: int = 1):
    """Drugs whose effects are linear in their features, measured at four doses: each drug's effect
    at dose d its full effect times a Hill curve with its own potency (IC50 log-uniform over
    100-1000; ``dose_matters=False``: the same effect at every dose), plus noise. Returns the
    labels, full effects, truth by dose, the pooled (mean over doses) effects, and the table."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(k, p))
    full = features @ (0.3 * rng.normal(size=(p, g)))
    ic50 = np.exp(rng.uniform(np.log(100), np.log(1000), k))
    labels = [f"drug{i}" for i in range(k)]
    truth = {lab: [(d, (d / (d + ic50[i]) if dose_matters else 0.6) * full[i] + 0.02 * rng.normal(size=g))
                   for d in DOSES] for i, lab in enumerate(labels)}
    pooled = {lab: np.mean([y for _, y in truth[lab]], 0) for lab in labels}
    table = FeatureTable("drug", [FeatureBlock("user", "features.tsv", labels, features)])
    return labels, full, truth, pooled, table, [f"g{i}" for i in range(g)]


def test_an_unseen_drug_takes_the_dose_curve_the_seen_drugs_share():
    """An unseen drug's effect was its effect pooled over doses at every dose > 0 (the same change
    at 10 nM as at 10 uM). With seen drugs measured at several doses, the prior's dose curve
    (cross-validated against flat) scales it: held-out drugs' effects at each dose are predicted
    far better than flat, though each drug has its own potency."""
    labels, _, truth, pooled, table, genes = _dosed_screen(dose_matters=True)
    seen = labels[:30]
    prior = PerturbationPrior.fit(genes, {"drug": {lab: pooled[lab] for lab in seen}}, {"drug": table},
                                  by_dose={"drug": {lab: truth[lab] for lab in seen}})
    dose = prior.report()["drug"]["dose"]
    assert dose["kind"] == "shared" and dose["n_dosed"] == 30 and dose["cv_sse_curve"] < 0.5 * dose["cv_sse_flat"]
    scale = prior.dose_scale("drug", np.array(DOSES))
    assert np.all(np.diff(scale) > 0) and scale[0] < 0.2 and scale[-1] > 1.2  # the pooled effect lies between
    np.testing.assert_allclose(prior.dose_scale("drug", [0.0, 1e6, 1.0]), [0.0, scale[-1], scale[0]])  # held at ends
    between = prior.dose_scale("drug", [np.expm1(np.mean(np.log1p(DOSES[1:3])))])[0]
    assert between == pytest.approx(np.mean(scale[1:3]))  # linear in log1p(dose) between measured doses
    curved = flat = 0.0
    for lab in labels[30:]:
        effect = prior.predict("drug", lab)[0]
        for d, y in truth[lab]:
            curved += np.sum((prior.dose_scale("drug", [d])[0] * effect - y) ** 2)
            flat += np.sum((effect - y) ** 2)
    assert curved < 0.2 * flat  # 29.0 against 317.7
    # saved and read back with the model
    again = PerturbationPrior.from_state(prior.to_state())
    np.testing.assert_array_equal(again.dose_scale("drug", np.array(DOSES)), scale)
    assert "dose response of an unseen perturbation: shared by 30 seen ones" in prior.summary()


def test_a_dose_that_changes_nothing_keeps_the_response_flat():
    """Where the seen drugs' effects do not change with the dose, the curve is rejected by the
    cross-validation (one-standard-error rule) and every dose > 0 takes the pooled effect; one
    dose per drug, or a prior saved before the curve, is flat too."""
    labels, _, truth, pooled, table, genes = _dosed_screen(dose_matters=False)
    prior = PerturbationPrior.fit(genes, {"drug": pooled}, {"drug": table}, by_dose={"drug": truth})
    assert prior.report()["drug"]["dose"]["kind"] == "flat"
    np.testing.assert_array_equal(prior.dose_scale("drug", [0.0, 10.0, 1e4]), [0.0, 1.0, 1.0])
    single = PerturbationPrior.fit(genes, {"drug": pooled}, {"drug": table},
                                   by_dose={"drug": {lab: truth[lab][:1] for lab in labels}})
    assert single.report()["drug"]["dose"]["kind"] == "flat" and "two or more doses" in \
        single.report()["drug"]["dose"]["why"]
    state = prior.to_state()
    state["keys"]["drug"].pop("dose")
    np.testing.assert_array_equal(PerturbationPrior.from_state(state).dose_scale("drug", [0.0, 5.0]), [0.0, 1.0])
