"""A mouse lab's inputs: gene names in mouse case, Ensembl mouse IDs, a human network by mistake.

Checked here: a design target given in the other case (``ISG15>=3`` on a mouse ``Isg15``) is
refused with a hint naming the gene as the data names it (by symbol, with IDs as ``var_names``
too, and on the Klein 2015 mouse time course of ../shared when present); a human (upper-case) TF
network on mouse genes says the case, so likely the species, differs (no TF matched: an error;
too few TFs: an error; only a few of its edges matched: a warning), while a mouse network scores
without a word; a knockout named ``STAT1`` or ``Stat1`` finds the mouse gene ``Stat1`` (by
symbol, with versioned ``ENSMUSG`` IDs as ``var_names``) for its self-effect, the linear
baseline's features, an unseen knockout's prior features and the PDS of ``evaluate_perturbation``;
``run_design`` refuses a human network on a mouse model before any work, or warns once; cell-eval's
gene names and the design's ``genes.tsv`` show the mouse symbols of versioned IDs. (scidiff does
no QC naming ``MT-`` or ``RPS``/``RPL`` genes, so mouse ``mt-`` genes are no special case.)
"""
from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.data.gene_symbols import readable_names, symbol_index
from scidiff.data.perturbation_features import FeatureBlock, FeatureTable, resolve_genes
from scidiff.evaluation.perturbation import gene_pca_features
from scidiff.tasks.design.attribution import tf_weight_matrix
from scidiff.tasks.design.targets import PhenotypeTarget, UnknownGeneError

SYMBOLS = ["Stat1", "Isg15", "Cd4", "mt-Co1", "Rps3", "Rpl13", "Gm12345", "1700001C19Rik"] + \
    [f"Gene{i}" for i in range(16)]
IDS = [f"ENSMUSG{i:011d}.{i % 7 + 1}" for i in range(len(SYMBOLS))]  # versioned mouse Ensembl IDs
KLEIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                     "klein15_mesc_lif_timecourse_tmscc.h5ad")


def _mouse_cells(by_id: bool = True, seed: int = 0) -> ad.AnnData:
    """Counts of mouse genes, indexed by versioned ENSMUSG ID with the symbol in var['gene_symbols']
    (``by_id``) or by symbol; a Stat1 knockout arm beside controls."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, (60, len(SYMBOLS))).astype(np.float32)
    var = pd.DataFrame({"gene_symbols": SYMBOLS}, index=IDS) if by_id else pd.DataFrame(index=SYMBOLS)
    obs = pd.DataFrame({"perturbation": np.array(["control", "Stat1", "Isg15"])[np.arange(60) % 3]},
                       index=[f"c{i}" for i in range(60)])
    return ad.AnnData(x, obs=obs, var=var)


# -- design targets --------------------------------------------------------------------------------

def test_design_target_in_human_case_is_refused_naming_the_mouse_symbol():
    with pytest.raises(UnknownGeneError, match=r"'ISG15' \(close matches: Isg15"):
        PhenotypeTarget.parse("ISG15>=3").check(SYMBOLS)


def test_design_target_in_human_case_on_mouse_ids_names_the_mouse_symbol():
    spec = scidiff.setup_anndata(_mouse_cells(), n_top_genes=None).spec
    assert spec.model_gene("Stat1") == IDS[0]
    target = PhenotypeTarget.parse("Isg15>=3").check_in(spec)
    assert target.marker_genes == {IDS[1]: 3.0}
    with pytest.raises(UnknownGeneError, match=r"'ISG15' \(close matches: Isg15"):
        PhenotypeTarget.parse("ISG15>=3").check_in(spec)


@pytest.mark.skipif(not os.path.exists(KLEIN), reason="../shared/data/klein15_mesc_lif_timecourse_tmscc.h5ad "
                    "(the Klein 2015 mouse time course) is absent")
def test_klein_mouse_time_course_refuses_a_human_case_target_naming_the_mouse_gene():
    adata = ad.read_h5ad(KLEIN)
    assert {"day", "day_num"} <= set(adata.obs.columns) and "Krt18" in adata.var_names
    spec = scidiff.setup_anndata(adata, genes=["Krt18", "Krt8", "Actg1"], condition_keys=["day"]).spec
    assert PhenotypeTarget.parse("Krt18>=1").check_in(spec).marker_genes == {"Krt18": 1.0}
    with pytest.raises(UnknownGeneError, match=r"'KRT18' \(close matches: Krt18"):
        PhenotypeTarget.parse("KRT18>=1").check_in(spec)


# -- TF networks -----------------------------------------------------------------------------------

def _network(upper: bool) -> pd.DataFrame:
    """Two TFs with ten targets each among the mouse genes; human upper-case names with ``upper``."""
    name = str.upper if upper else (lambda g: g)
    return pd.DataFrame({"source": [name("Stat1")] * 10 + [name("Irf1")] * 10,
                         "target": [name(g) for g in SYMBOLS[4:14] + SYMBOLS[10:20]], "weight": 1.0})


def test_human_tf_network_on_mouse_genes_says_the_case_and_species_differ():
    with pytest.raises(ValueError, match=r"shares no target genes .*; 20 of its edges name a model gene in another "
                       r"case \(e\.g\. target 'RPS3' for the model's 'Rps3'\): the network is likely of another "
                       r"species \(human upper-case symbols on mouse genes"):
        tf_weight_matrix(_network(upper=True), SYMBOLS)


def test_human_tf_network_on_mouse_ids_says_the_case_differs_naming_the_mouse_symbol():
    with pytest.raises(ValueError, match=r"target 'RPS3' for the model's 'Rps3'\)"):
        tf_weight_matrix(_network(upper=True), IDS, gene_symbols=SYMBOLS)


def test_human_tf_network_matching_too_few_mouse_targets_says_the_case_differs():
    net = _network(upper=True)
    net.loc[:2, "target"] = SYMBOLS[4:7]  # three targets named alike in both species
    with pytest.raises(ValueError, match=r"no TF in the TF network has >= 5 targets .*most: 3, STAT1.*; 17 of its "
                       r"edges name a model gene in another case"):
        tf_weight_matrix(net, SYMBOLS)


def test_human_tf_network_reaching_a_few_mouse_targets_warns_that_the_case_differs():
    net = _network(upper=True)
    net.loc[:5, "target"] = SYMBOLS[4:10]
    with pytest.warns(UserWarning, match=r"only 6 of its edges reach the model's genes; 14 of its edges name a model "
                      r"gene in another case"):
        w, tfs, n = tf_weight_matrix(net, SYMBOLS)
    assert tfs == ["STAT1"] and n.tolist() == [6]


def test_mouse_tf_network_on_mouse_genes_and_ids_scores_without_a_word():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w, tfs, n = tf_weight_matrix(_network(upper=False), SYMBOLS)
        w_ids, tfs_ids, _ = tf_weight_matrix(_network(upper=False), IDS, gene_symbols=SYMBOLS)
    assert tfs == tfs_ids == ["Irf1", "Stat1"] and n.tolist() == [10, 10]
    np.testing.assert_array_equal(w, w_ids)
    assert w[:, 1].sum() == 10 and w[SYMBOLS.index("Rps3"), 1] == 1.0


# -- knockouts -------------------------------------------------------------------------------------

def test_stat1_knockout_finds_mouse_gene_stat1_in_either_case_by_symbol_of_versioned_ids():
    symbols = symbol_index(IDS, SYMBOLS)
    found = resolve_genes(["Stat1", "STAT1", "sgStat1_2", "isg15"], IDS, symbols)
    assert found == {"Stat1": IDS[0], "STAT1": IDS[0], "isg15": IDS[1]}
    assert resolve_genes(["STAT1", "Stat1"], SYMBOLS) == {"STAT1": "Stat1", "Stat1": "Stat1"}


def test_linear_baseline_features_find_a_mouse_knockout_given_in_human_case():
    adata = _mouse_cells()
    adata.X = np.log1p(adata.X)
    features = gene_pca_features(adata, ["STAT1", "Stat1", "Nope"], n_components=3)
    assert set(features) == {"STAT1", "Stat1"}
    np.testing.assert_array_equal(features["STAT1"], features["Stat1"])


def test_unseen_knockout_in_human_case_finds_its_mouse_gene_by_symbol_of_an_id():
    block = FeatureBlock("coexpression", "the training data's control cells", IDS, np.eye(len(IDS)), by="gene")
    table = FeatureTable("perturbation", [block], gene_targets=True, target_genes={"Stat1": IDS[0]},
                         gene_symbols=symbol_index(IDS, SYMBOLS))
    assert table.gene_of("Isg15") == table.gene_of("ISG15") == table.gene_of("isg15") == IDS[1]
    assert table.describes("ISG15")
    np.testing.assert_array_equal(table.rows("ISG15")["coexpression"], np.eye(len(IDS))[1])
    assert table.gene_of("MT-CO1") == IDS[3] and table.gene_of("Nope") is None


def test_unseen_knockout_case_match_is_refused_where_two_symbols_fold_alike():
    table = FeatureTable("perturbation", [], gene_targets=True, gene_symbols={"Abc1": "ENSMUSG1", "ABC1": "ENSG1"})
    assert table.gene_of("ABC1") == "ENSG1" and table.gene_of("abc1") is None


# -- evaluation names ------------------------------------------------------------------------------

def test_cell_eval_names_versioned_mouse_ids_by_their_mouse_symbols():
    var = _mouse_cells().var
    assert readable_names(var, IDS[:5]) == ["Stat1", "Isg15", "Cd4", "mt-Co1", "Rps3"]


def test_evaluate_leaves_a_human_case_knockout_label_own_mouse_gene_out_of_the_pds():
    """A knockout labelled ``STAT1`` on mouse genes (``Stat1``, files indexed by versioned ENSMUSG
    IDs or by symbol): its own gene is left out of the PDS as ``Stat1``'s would be, so a prediction
    right in every gene but its own, which is far off, is ranked first (last with the gene in)."""
    from scidiff.tasks.evaluate import evaluate_perturbation

    rng = np.random.default_rng(0)
    symbols, ids = SYMBOLS[:8], IDS[:8]
    labels = np.repeat(["control", "STAT1", "Isg15", "Cd4"], 40)
    x = 2.0 + 0.01 * rng.normal(size=(len(labels), 8))
    x[labels == "STAT1", 0] -= 1.5
    x[labels == "Isg15", 1] -= 0.3
    x[labels == "Cd4", 2] -= 0.3
    x[labels == "Cd4", 4] += 0.2
    obs = pd.DataFrame({"pert": labels}, index=[f"c{i}" for i in range(len(labels))])
    pred_x = x.copy()
    pred_x[labels == "STAT1", 0] += 5.0
    for names in (symbols, ids):
        var = pd.DataFrame({"gene_symbols": symbols}, index=names)
        real = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
        pred = ad.AnnData(X=pred_x.astype(np.float32), obs=obs, var=var.copy())
        out = evaluate_perturbation(real, pred, "pert", "control", cell_eval=False)
        assert out["per_perturbation"]["STAT1"]["pds_l1"] == 1.0


def test_unseen_mouse_knockout_named_in_human_case_gets_the_prior_of_its_mouse_gene():
    """A mouse screen indexed by versioned ENSMUSG IDs, symbols in ``var['gene_name']``: the unseen
    knockout ``STAT1`` is the gene ``Stat1`` (its co-expression features, its self-effect), as
    ``Stat1`` is."""
    from scidiff.models.perturbation_prior import PerturbationPrior

    from test_streaming_perturbations import GENES, SETUP, _screen

    mouse = {g: f"Gene{i}" for i, g in enumerate(GENES)} | {"G25": "Stat1", "G26": "mt-Co1"}
    ids = [f"ENSMUSG{i:011d}.{i % 5 + 1}" for i in range(len(GENES))]
    screen = _screen()
    screen.obs["pert"] = ["+".join(mouse.get(p, p) for p in lab.split("+")) for lab in screen.obs["pert"]]
    screen.var = pd.DataFrame({"gene_name": [mouse[g] for g in GENES]}, index=ids)
    prior = PerturbationPrior.from_cells(scidiff.setup_anndata(screen, **SETUP), screen)
    assert prior.describe("pert", "Stat1")["target_gene"] == prior.describe("pert", "STAT1")["target_gene"] == ids[25]
    assert prior.describe("pert", "MT-CO1")["target_gene"] == ids[26]
    (a, ca), (b, cb) = prior.effect("pert", "Stat1"), prior.effect("pert", "STAT1")
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert ca == cb and float(a[25]) < 0  # the knocked-out gene's own self-effect


@pytest.fixture(scope="module")
def mouse_model():
    """A tiny model of mouse cells indexed by versioned ENSMUSG IDs with symbols in var."""
    from training_helpers import TRAIN_KW

    data = scidiff.setup_anndata(_mouse_cells(), n_top_genes=None, perturbation_keys=["perturbation"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100)
    scidiff.ScIDiffTrainer(model, data.loader(60), **TRAIN_KW).train(2)
    return model.eval()


def test_run_design_with_a_human_network_on_mouse_genes_refuses_or_warns_once_naming_the_case(mouse_model, tmp_path):
    from scidiff.tasks.design import job

    kw = dict(n=4, steps=3, progress=False, screen=False)
    with pytest.raises(ValueError, match=r"shares no target genes .*target 'RPS3' for the model's 'Rps3'"):
        job.run_design(mouse_model, "Isg15>=1", tmp_path / "none.h5ad", tf_network=_network(upper=True), **kw)
    assert not os.listdir(tmp_path)  # refused before any work
    net = _network(upper=True)
    net.loc[:5, "target"] = SYMBOLS[4:10]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        job.run_design(mouse_model, "Isg15>=1", tmp_path / "few.h5ad", tf_network=net, **kw)
    said = [str(w.message) for w in record if "another case" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("the TF network: only 6 of its edges reach the model's genes; 14 of "
                                                  "its edges name a model gene in another case")
    assert pd.read_csv(tmp_path / "few.tfs.tsv", sep="\t")["tf"].tolist() == ["STAT1"]
    genes = pd.read_csv(tmp_path / "few.genes.tsv", sep="\t").set_index("gene")["symbol"]
    assert genes[IDS[1]] == "Isg15" and genes[IDS[3]] == "mt-Co1"  # versioned mouse IDs shown by their symbols
