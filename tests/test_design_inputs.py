"""Inverse design with the inputs a biologist brings: TF networks with or without a header, with
weights that are NaN or not numbers, targets with tolerances per gene, gene levels without a
level, genes named by symbol beside Ensembl IDs. Synthetic and model-free (fast)."""
import numpy as np
import pandas as pd
import pytest

from scidiff.data.spec import DataSpec
from scidiff.tasks.design import (PhenotypeTarget, UnknownGeneError, read_tf_network, tf_activity_change,
                                  tf_weight_matrix)

GENES = [f"G{i}" for i in range(40)]


def _network():
    rows = [("UPTF", g, 1.0) for g in GENES[:8]] + [("DOWNTF", g, 1.0) for g in GENES[10:20]]
    return pd.DataFrame(rows, columns=["source", "target", "weight"])


def _cells():
    rng = np.random.default_rng(0)
    source = rng.gamma(2.0, 0.5, (12, len(GENES)))
    designed = source.copy()
    designed[:, :8] += 1.0
    return source, designed


# -- TF network weights ------------------------------------------------------------------------------

def test_a_nan_weight_in_a_network_table_is_named_not_scored_as_no_change():
    source, designed = _cells()
    net = _network()
    net.loc[0, "weight"] = np.nan
    # UPTF's targets all went up; a NaN weight made its activity 0 in every cell: ranked "no change, p = 1"
    with pytest.raises(ValueError, match=r"the TF network has 1 non-numeric or missing weight\(s\): "
                                         r"row 1: UPTF -> G0, weight '\(missing\)'"):
        tf_activity_change(source, designed, net, GENES)
    words = _network().astype({"weight": object})
    words.loc[3, "weight"] = "strong"  # was "could not convert string to float: 'strong'", naming nothing
    with pytest.raises(ValueError, match=r"row 4: UPTF -> G3, weight 'strong'"):
        tf_weight_matrix(words, GENES)
    infinite = _network()
    infinite.loc[9, "weight"] = np.inf
    with pytest.raises(ValueError, match=r"infinite weight\(s\): row 10: DOWNTF -> G11, weight inf"):
        tf_weight_matrix(infinite, GENES)


def test_an_infinite_weight_in_a_network_file_is_refused_with_its_row(tmp_path):
    path = tmp_path / "net.tsv"
    path.write_text("source\ttarget\tweight\n" + "".join(f"UPTF\t{g}\t1\n" for g in GENES[:7]) + "UPTF\tG7\tinf\n")
    with pytest.raises(ValueError, match=r"TF network '.*net.tsv' has 1 non-numeric, missing or infinite "
                                         r"weight\(s\): row 8: UPTF -> G7, weight inf"):
        read_tf_network(path)


# -- TF network layout -------------------------------------------------------------------------------

def test_a_network_file_without_a_header_reads_as_source_target_weight(tmp_path):
    source, designed = _cells()
    path = tmp_path / "plain.tsv"
    _network().to_csv(path, sep="\t", index=False, header=False)
    net = read_tf_network(path)
    assert list(net.columns) == ["source", "target", "weight"] and len(net) == 18  # the first edge kept
    assert net.iloc[0].tolist() == ["UPTF", "G0", 1.0]
    expected = tf_activity_change(source, designed, _network(), GENES)
    got = tf_activity_change(source, designed, path, GENES)
    pd.testing.assert_frame_equal(got, expected)
    assert got["tf"].iloc[0] == "UPTF"
    # a bad weight in a headerless file is counted from the first line
    bad = tmp_path / "bad.tsv"
    bad.write_text("UPTF\tG0\t1\nUPTF\tG1\tstrong\n")
    with pytest.raises(ValueError, match=r"row 2: UPTF -> G1, weight 'strong'"):
        read_tf_network(bad)


def test_network_columns_in_another_case_or_mor_are_read(tmp_path):
    path = tmp_path / "caps.tsv"
    _network().rename(columns=str.capitalize).to_csv(path, sep="\t", index=False)
    assert list(read_tf_network(path).columns) == ["source", "target", "weight"]
    # decoupler's older 'mor' column is read by read_tf_network; a table passed directly was refused
    w, tfs, n = tf_weight_matrix(_network().rename(columns={"weight": "mor"}), GENES)
    assert tfs == ["DOWNTF", "UPTF"] and list(n) == [10, 8] and w[:8, 1].tolist() == [1.0] * 8
    # a comma-separated file is named as such
    csv = tmp_path / "net.csv"
    _network().to_csv(csv, index=False)
    with pytest.raises(ValueError, match="looks comma-separated"):
        read_tf_network(csv)


def test_network_genes_partly_missing_rank_on_the_shared_ones():
    source, designed = _cells()
    net = pd.concat([_network(), pd.DataFrame({"source": "UPTF", "target": ["NOTAGENE1", "NOTAGENE2"],
                                               "weight": 1.0})])
    table = tf_activity_change(source, designed, net, GENES).set_index("tf")
    assert table.loc["UPTF", "n_targets"] == 8 and table.loc["UPTF", "change"] > 0


# -- targets -----------------------------------------------------------------------------------------

def test_a_nan_tolerance_is_refused():
    # a NaN tolerance made every bound NaN: no cell ever met the target, and every retry was spent
    with pytest.raises(ValueError, match="tolerance >= 0"):
        PhenotypeTarget(marker_genes={"G1": 1.0}, tolerance=float("nan")).check(GENES)
    with pytest.raises(ValueError, match="tolerance >= 0"):
        PhenotypeTarget(marker_genes={"G1": 1.0}, tolerance={"G1": float("nan")}).check(GENES)
    with pytest.raises(TypeError, match="tolerance must be a number"):
        PhenotypeTarget(marker_genes={"G1": 1.0}, tolerance="0.5").check(GENES)
    PhenotypeTarget(marker_genes={"G1": 1.0}, tolerance=np.float32(0.5)).check(GENES)


def test_a_tolerance_for_a_gene_not_in_the_target_is_refused():
    # {"g1": 1.0} (a case slip) silently left G1 at the default tolerance 0.1
    with pytest.raises(ValueError, match=r"tolerance names gene\(s\) \['g1'\] that the target does not have"):
        PhenotypeTarget(marker_genes={"G1": 1.0}, tolerance={"g1": 1.0}).check(GENES)
    target = PhenotypeTarget(marker_genes={"G1": 1.0}, tolerance={"G1": 1.0}).check(GENES)
    assert target.constraints[0].bounds()[0] == 0.0


def test_gene_targets_need_a_level_per_gene():
    # gene_targets=["G1"] was read as G1 == 0: the gene switched off, where the user meant it present
    with pytest.raises(TypeError, match=r"gene_targets needs a level per gene, e.g. \{'G1': 2.0\}"):
        PhenotypeTarget(gene_targets=["G1"])
    with pytest.raises(ValueError, match=r"marker_genes: the level of 'G1' must be a number .* got 'high'"):
        PhenotypeTarget(marker_genes={"G1": "high"})
    assert PhenotypeTarget(gene_targets={"G1": 2}).gene_targets == {"G1": 2.0}


def test_unknown_gene_error_counts_the_model_genes_once_with_symbols():
    ids = [f"ENSG{i:011d}" for i in range(4)]
    spec = DataSpec(gene_names=ids, gene_symbols=["ISG15", "IFIT1", "MX1", "CD4"])
    target = PhenotypeTarget.parse("isg15>=1")
    with pytest.raises(UnknownGeneError, match=r"model's genes \(4 genes\): 'isg15' \(close matches: ISG15\)"):
        target.check_in(spec)
    renamed = PhenotypeTarget.parse("ISG15>=1", tolerance={"ISG15": 0.5}).check_in(spec)
    assert renamed.marker_genes == {ids[0]: 1.0} and renamed.tolerance == {ids[0]: 0.5}


def test_a_network_by_symbol_ranks_tfs_over_genes_named_by_id():
    # a model trained on a file indexed by Ensembl ID: result.gene_names are IDs; networks name symbols
    source, designed = _cells()
    ids = [f"ENSG{i:011d}" for i in range(len(GENES))]
    with pytest.raises(ValueError, match="gene_symbols= matches symbols to IDs"):
        tf_activity_change(source, designed, _network(), ids)
    by_symbol = tf_activity_change(source, designed, _network(), ids, gene_symbols=GENES)
    pd.testing.assert_frame_equal(by_symbol, tf_activity_change(source, designed, _network(), GENES))
    w, tfs, _ = tf_weight_matrix(_network(), ids, gene_symbols=[""] * 3 + GENES[3:])  # G0-G2 carry no symbol
    assert w[:, tfs.index("UPTF")].sum() == 5.0
    with pytest.raises(ValueError, match="gene_symbols has 3 symbols for 40 genes"):
        tf_weight_matrix(_network(), ids, gene_symbols=GENES[:3])


# -- with a (tiny, untrained) model whose genes are Ensembl IDs with symbols beside ------------------

SYMBOLS = ["ISG15", "IFIT1", "IFIT3", "MX1", "IFI6", "CD3E", "CD3D", "CD4"]


@pytest.fixture(scope="module")
def id_model():
    import anndata as ad
    import torch

    import scidiff

    rng = np.random.default_rng(0)
    ids = [f"ENSG{i:011d}" for i in range(len(SYMBOLS))]
    adata = ad.AnnData(X=rng.gamma(2.0, 0.5, (60, len(ids))).astype(np.float32),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(60)]),
                       var=pd.DataFrame({"gene_symbols": SYMBOLS}, index=ids))
    torch.manual_seed(0)
    data = scidiff.setup_anndata(adata, n_top_genes=None, scaling="none")
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=50)
    return model.eval(), adata


def test_attribution_and_tf_ranking_of_a_design_from_noise_say_there_is_no_source(id_model):
    from scidiff.tasks.design import InverseDesigner, gene_attribution

    model, _ = id_model
    designer = InverseDesigner(model, observed=False)
    target = PhenotypeTarget.parse("ISG15>=0.5")
    result = designer.design(target, 4, steps=2)
    assert result.source is None
    # was "TypeError: can't convert np.ndarray of type numpy.object_"
    with pytest.raises(ValueError, match="source_expression is None: a design started from noise"):
        gene_attribution(designer, target, result.source, result.expression, steps=2)
    network = pd.DataFrame({"source": "STAT1", "target": SYMBOLS[:5], "weight": 1.0})
    with pytest.raises(ValueError, match="source_expression is None"):
        tf_activity_change(result.source, result.expression, network, result.gene_names)
    table = tf_activity_change(result.expression, result.expression, network, result.gene_names,
                               gene_symbols=model.data_spec.gene_symbols)
    assert table["tf"].tolist() == ["STAT1"] and table["n_targets"].tolist() == [5]


def test_design_refuses_a_bad_tolerance_before_sampling(id_model):
    import scidiff

    model, _ = id_model
    with pytest.raises(ValueError, match="tolerance >= 0"):
        scidiff.design(model, PhenotypeTarget.parse("ISG15>=0.5", tolerance=float("nan")), n=2, steps=2)
    with pytest.raises(ValueError, match=r"tolerance names gene\(s\) \['isg15'\]"):
        scidiff.design(model, PhenotypeTarget(marker_genes={"ISG15": 0.5}, tolerance={"isg15": 1.0}), n=2, steps=2)
    # by symbol, renamed to the ID with its tolerance
    cells = scidiff.design(model, PhenotypeTarget(marker_genes={"ISG15": 0.5}, tolerance={"ISG15": 1.0}), n=2,
                           steps=2, retries=0, observed=False)
    assert cells.uns["scidiff_design"]["target"]["tolerance"] == {"ENSG00000000000": 1.0}
