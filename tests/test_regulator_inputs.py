"""Pointing to the regulators behind a phenotype with the inputs a biologist brings: TF networks with
empty fields, numeric TF IDs or DoRothEA's own column names; ULM and WMEAN against decoupler's
closed forms; a phenotype naming one gene by symbol and by ID; combinations to screen given as one
label; and, on a tiny model trained on Ensembl IDs with symbols beside, a screen and a TF ranking
whose answers are known, written to disk all or nothing."""
import json
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.data.spec import DataSpec
from scidiff.tasks.design import (InverseDesigner, PhenotypeTarget, candidate_conditions, read_tf_network,
                                  screen_perturbations, tf_activity_change, tf_weight_matrix, ulm, wmean)
from scidiff.tasks.design import job
from training_helpers import drug_knockout_model

GENES = [f"G{i}" for i in range(30)]


def _cells(up=slice(0, 6)):
    rng = np.random.default_rng(0)
    source = rng.gamma(2.0, 0.5, (10, len(GENES)))
    designed = source.copy()
    designed[:, up] += 1.0
    return source, designed


# -- the network as written -------------------------------------------------------------------------

def test_an_edge_without_a_tf_or_target_name_is_refused_with_its_row(tmp_path):
    body = "".join(f"UPTF\t{g}\t1\n" for g in GENES[:6])
    no_tf = tmp_path / "no_tf.tsv"  # six edges whose TF field is empty: they were ranked as the TF 'nan'
    no_tf.write_text("source\ttarget\tweight\n" + body + "".join(f"\t{g}\t1\n" for g in GENES[10:16]))
    with pytest.raises(ValueError, match=r"no_tf.tsv' has 6 edge\(s\) without a TF \(source\) or target name: "
                                         r"row 7: \(missing\) -> G10; row 8"):
        read_tf_network(no_tf)
    no_target = tmp_path / "no_target.tsv"  # headerless, a blank target
    no_target.write_text(body + "UPTF\t \t1\n")
    with pytest.raises(ValueError, match=r"row 7: UPTF -> \(missing\)"):
        read_tf_network(no_target)
    table = pd.DataFrame({"source": [None] + ["UPTF"] * 6, "target": GENES[:7], "weight": 1.0})
    with pytest.raises(ValueError, match=r"the TF network has 1 edge\(s\) .*row 1: \(missing\) -> G0"):
        tf_weight_matrix(table, GENES)


def test_names_are_read_as_written(tmp_path):
    # a gene named like a number kept as written ('7' was read back as '7.0' beside a '2.5'), 'NA' not a
    # missing value, blanks around names dropped
    genes = [str(i) for i in range(12)] + ["2.5", "NA"]
    path = tmp_path / "net.tsv"
    path.write_text("source\ttarget\tweight\n" + "".join(f"TF1 \t{g}\t1\n" for g in genes[:5] + ["2.5", "NA"]))
    net = read_tf_network(path)
    assert net["target"].tolist() == ["0", "1", "2", "3", "4", "2.5", "NA"] and set(net["source"]) == {"TF1"}
    w, tfs, n = tf_weight_matrix(net, genes)
    assert tfs == ["TF1"] and n.tolist() == [7] and w[:, 0].sum() == 7


def test_tfs_named_by_number_are_ranked():
    # Entrez IDs as TF names: was "KeyError: None of [Index(['1234', '7157'])] are in the [index]"
    source, designed = _cells()
    net = pd.DataFrame({"source": [7157] * 6 + [1234] * 6, "target": GENES[:6] + GENES[10:16], "weight": 1.0})
    table = tf_activity_change(source, designed, net, GENES)
    assert table["tf"].tolist() == ["7157", "1234"] and table["change"].iloc[0] > 0


def test_dorothea_tf_and_mor_columns_are_read(tmp_path):
    # DoRothEA's own export: tf, confidence, target, mor (was refused: "lacks column(s) ['source']")
    path = tmp_path / "dorothea.tsv"
    rows = [("UPTF", "A", g, 1) for g in GENES[:6]] + [("OTHER", "B", g, -1) for g in GENES[10:16]]
    pd.DataFrame(rows, columns=["tf", "confidence", "target", "mor"]).to_csv(path, sep="\t", index=False)
    net = read_tf_network(path)
    assert list(net.columns) == ["source", "target", "weight"] and net["weight"].tolist() == [1] * 6 + [-1] * 6
    source, designed = _cells()
    assert tf_activity_change(source, designed, path, GENES)["tf"].iloc[0] == "UPTF"


# -- decoupler's scores, closed forms -----------------------------------------------------------------

def test_ulm_and_wmean_match_decouplers_closed_forms():
    w = np.array([[1.0], [1.0], [0.0], [0.0]])
    x = np.array([[3.0, 1.0, 0.0, 0.0]])
    # r = 2 / sqrt(6), df = 2: t = r sqrt(df / (1 - r^2)) = 2 (slope 2, residual SE 1)
    assert ulm(x, w)[0, 0] == pytest.approx(2.0, rel=1e-12)
    assert wmean(x, w)[0, 0] == pytest.approx(2.0)  # (3 + 1) / (|1| + |1|)
    assert wmean(x, np.array([[1.0], [-1.0], [0.0], [0.0]]))[0, 0] == pytest.approx(1.0)
    # a cell that is exactly the TF's program: decoupler's r = 1 gives sqrt(2 / (1e-16 * 2)) = 1e8; it scored 0,
    # below a cell a hair off the program (5e7)
    exact = np.array([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    np.testing.assert_allclose(ulm(exact, w)[:, 0], [1e8, -1e8], rtol=1e-6)
    assert ulm(exact + [[0, 1e-7, 0, 0], [0, 0, 0, 0]], w)[0, 0] < ulm(exact, w)[0, 0]
    assert ulm(np.full((1, 4), 3.0), w)[0, 0] == 0.0  # a constant cell carries no activity


# -- the phenotype ------------------------------------------------------------------------------------

def test_one_gene_named_by_symbol_and_by_id_with_two_levels_is_refused():
    ids = [f"ENSG{i:011d}" for i in range(3)]
    spec = DataSpec(gene_names=ids, gene_symbols=["ISG15", "IFIT1", "MX1"])
    # ISG15>=1 was silently replaced by the ID's >=2
    with pytest.raises(ValueError, match=r"marker_genes \(GENE>=v\): 'ISG15' and 'ENSG00000000000' name the same "
                                         r"gene ENSG00000000000 with different values \(1.0 and 2.0\)"):
        PhenotypeTarget.parse("ISG15>=1,ENSG00000000000>=2").check_in(spec)
    with pytest.raises(ValueError, match=r"tolerance: 'ISG15' and 'ENSG00000000000' name the same gene"):
        PhenotypeTarget(marker_genes={"ISG15": 1.0}, tolerance={"ISG15": 0.2, ids[0]: 0.5}).check_in(spec)
    same = PhenotypeTarget.parse("ISG15>=1,ENSG00000000000>=1,IFIT1<=0.5").check_in(spec)
    assert [str(c) for c in same.constraints] == [f"{ids[0]}>=1", f"{ids[1]}<=0.5"]


# -- a tiny model trained on Ensembl IDs, a knockout whose effect is known ----------------------------

IDS = [f"ENSG{i:011d}" for i in range(12)]
SYMBOLS = [f"S{i}" for i in range(12)]


@pytest.fixture(scope="module")
def screen_model(tmp_path_factory):
    """'X' knocked out raises S0-S3 by 2, 'Y' lowers S6-S7, 'X+Y' both; two cell types (a context
    key); genes indexed by Ensembl ID with symbols in var."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 2.0, 12)
    base[:4] = 0.3
    effects = {"control": np.zeros(12), "X": np.r_[np.full(4, 2.0), np.zeros(8)], "Y": np.zeros(12)}
    effects["Y"][[6, 7]] = -1.0
    effects["X+Y"] = effects["X"] + effects["Y"]
    xs, ko, cell_type = [], [], []
    for label, effect in effects.items():
        for ct, shift in (("A", 0.0), ("B", 0.5)):
            xs.append(np.clip(base + effect + shift * (np.arange(12) >= 8) + rng.normal(0, 0.15, (60, 12)), 0, None))
            ko += [label] * 60
            cell_type += [ct] * 60
    adata = ad.AnnData(X=np.vstack(xs).astype(np.float32),
                       obs=pd.DataFrame({"ko": ko, "cell_type": cell_type}, index=[str(i) for i in range(len(ko))]),
                       var=pd.DataFrame({"gene_symbols": SYMBOLS}, index=IDS))
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, condition_keys=["cell_type"], perturbation_keys=["ko"],
                                 scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=50)
    scidiff.ScIDiffTrainer(model, data.loader(120), device="cpu", progress=False, early_stopping_patience=None,
                           learning_rate=3e-3, warmup_steps=10).train(60)
    path = tmp_path_factory.mktemp("regulators") / "cells.h5ad"
    adata.write_h5ad(path)
    return model.eval(), adata, path


def test_a_combination_given_as_one_label_is_screened(screen_model):
    model, adata, _ = screen_model
    assert model.data_spec.gene_symbols == SYMBOLS
    # "X+Y" was read letter by letter ('X', '+', 'Y'): the combination was silently left out of the screen
    assert candidate_conditions(model, "Y+X") == [{"ko": lab} for lab in ["control", "X", "Y", "X+Y"]]
    with pytest.raises(ValueError, match=r"combinations name perturbation key\(s\) \['drug'\] the model does not "
                                         r"have; its perturbation keys: \['ko'\]"):
        candidate_conditions(model, {"drug": ["X+Y"]})  # was silently screened without the combination
    control = adata[adata.obs["ko"] == "control"].copy()
    up = PhenotypeTarget(marker_genes={"S0": 1.5, "S1": 1.5, "S2": 1.5})
    table = screen_perturbations(InverseDesigner(model, observed=False), up, control, combinations="X+Y",
                                 n_cells=24, steps=8)
    assert set(table["condition"][:2]) == {"ko=X", "ko=X+Y"} and table["fraction_met"].iloc[1] >= 0.8
    assert table["fraction_met"].iloc[2:].max() <= 0.1


def test_run_design_ranks_the_knockout_and_the_tf_behind_a_phenotype_by_symbol(screen_model, tmp_path):
    model, _, data = screen_model
    net = tmp_path / "collectri.tsv"  # by symbol, decoupler's 'mor', an extra column, two targets not in the model
    rows = [("TX", s, 1, "PMID:1") for s in SYMBOLS[:5] + ["NOTAGENE1", "NOTAGENE2"]]
    rows += [("TY", s, 1, "PMID:2") for s in SYMBOLS[6:11]]
    pd.DataFrame(rows, columns=["source", "target", "mor", "PMID"]).to_csv(net, sep="\t", index=False)
    out = tmp_path / "designed.h5ad"
    kw = dict(data=str(data), source={"ko": "control"}, tf_network=str(net), n=16, steps=8, progress=False)
    report = job.run_design(model, "S0>=1.5,S1>=1.5", out, **kw)
    assert report["screen_top"][0]["condition"] in ("ko=X", "ko=X+Y") and report["fraction_met_all"] >= 0.9
    assert {r["condition"] for r in report["screen_top"][:2]} == {"ko=X", "ko=X+Y"}
    tfs = pd.read_csv(tmp_path / "designed.tfs.tsv", sep="\t")
    assert tfs["tf"].tolist()[0] == "TX" and tfs["change"].iloc[0] > 0 and tfs["n_targets"].tolist()[0] == 5
    # the report names what the TF ranking holds: the network file and how activity was scored
    assert report["tfs_scored"]["network"] == str(net) and report["tfs_scored"]["method"] == "ulm"
    assert json.loads((tmp_path / "designed.report.json").read_text())["tfs_scored"]["n_tfs"] == 2
    first = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if f.startswith("designed")}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # a second run failing on its last file: its screen, gene and TF rankings were already renamed into
    # place beside the first run's cells and report
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job, "write_h5ad", full_disk)
        with pytest.raises(OSError, match="No space left"):
            job.run_design(model, "S0>=1.5", out, seed=1, **kw)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if f.startswith("designed")} == first
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_a_screen_keeps_the_perturbation_the_condition_sets():
    """Screening drugs on a knockout's cells (condition={'ko': 'K1'}, candidates over 'drug') left the
    knockout out: every perturbation key of ``condition`` was dropped, and the screen was that of the
    control background (the mean objective 5.84 with condition ko=K1 and with ko=control, 2.06 for
    the candidate {'drug': 'D1', 'ko': 'K1'} itself). Now a candidate's keys override the
    condition's, and the others are kept: the screen under the condition is the candidate with it."""
    model = drug_knockout_model(240, 20, 5, epochs=3)
    designer = InverseDesigner(model, observed=False)
    up = PhenotypeTarget(marker_genes={"G0": 6.0, "G1": 6.0})

    def objective(**kw):
        return screen_perturbations(designer, up, n_cells=16, steps=5, **kw)["mean_objective"].item()

    on_k1 = objective(condition={"ko": "K1"}, candidates=[{"drug": "D1"}])
    assert on_k1 == objective(candidates=[{"drug": "D1", "ko": "K1"}])
    assert abs(on_k1 - objective(condition={"ko": "control"}, candidates=[{"drug": "D1"}])) > 0.5
    background = [{"ko": "control"}]  # a candidate's key wins over the condition's
    assert objective(condition={"ko": "K1"}, candidates=background) == objective(candidates=background)
