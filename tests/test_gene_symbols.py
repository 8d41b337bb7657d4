"""Files that index genes by Ensembl ID and keep symbols in a ``var`` column (CELLxGENE's
``feature_name``, GEARS' and Replogle's ``gene_name``): perturbation labels, design targets and TF
networks name genes by symbol, and get what they would on the same file indexed by symbol."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scidiff.data import setup_anndata, setup_streaming
from scidiff.data.gene_symbols import resolve_gene, symbol_column, symbol_index
from scidiff.models.perturbation_prior import PerturbationPrior
from scidiff.tasks.design.targets import PhenotypeTarget

from test_streaming_perturbations import GENES, SETUP, _screen

IDS = [f"ENSG{i:011d}" for i in range(len(GENES))]


def _by_id(adata: ad.AnnData, column: str = "feature_name") -> ad.AnnData:
    out = adata.copy()
    out.var = pd.DataFrame({column: GENES, "feature_length": np.arange(len(GENES))}, index=IDS)
    return out


def test_the_symbols_column_is_found_named_or_refused_by_name():
    var = pd.DataFrame({"n_cells": [3, 4], "gene_name": ["STAT1", "IRF1"]}, index=["ENSG1", "ENSG2"])
    assert symbol_column(var) == "gene_name"  # auto: a known name holding text unlike the index
    assert symbol_column(var, None) is None and symbol_column(var, "none") is None
    assert symbol_column(pd.DataFrame({"gene_name": ["A", "B"]}, index=["A", "B"])) is None  # index already symbols
    made_unique = pd.DataFrame({"gene_name": ["A", "B", "B", "C"]}, index=["A", "B", "B-1", "C"])
    assert symbol_column(made_unique) is None  # symbols as var_names, one made unique: not symbols beside IDs
    assert symbol_column(pd.DataFrame({"gene_symbols": [1, 2]}, index=["ENSG1", "ENSG2"])) is None  # not text
    with pytest.raises(KeyError, match=r"'symbol_col' is not in var of x\.h5ad.*'n_cells', 'gene_name'"):
        symbol_column(var, "symbol_col", "var of x.h5ad")
    # a symbol two IDs carry names neither; an ID resolves to itself first
    index = symbol_index(["E1", "E2", "E3", "E4"], ["A", "B", "B", ""])
    assert index == {"A": "E1"}
    assert resolve_gene("A", {"E1", "E2"}, index) == "E1" and resolve_gene("B", {"E1"}, index) is None
    assert resolve_gene("E2", {"E1", "E2"}, index) == "E2"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_screen_indexed_by_ids_gets_the_prior_its_symbols_give(tmp_path, streamed):
    by_symbol, by_id = _screen(), _by_id(_screen())
    if streamed:  # each against the same file indexed by symbol, set up the same way
        by_symbol.write_h5ad(tmp_path / "symbols.h5ad")
        by_id.write_h5ad(tmp_path / "ids.h5ad")
        ref = PerturbationPrior.from_streamed(setup_streaming(str(tmp_path / "symbols.h5ad"), hvg_cells=10**9,
                                                              **SETUP))
        cells = setup_streaming(str(tmp_path / "ids.h5ad"), hvg_cells=10**9, **SETUP)
        got = PerturbationPrior.from_streamed(cells)
    else:
        ref = PerturbationPrior.from_cells(setup_anndata(by_symbol, **SETUP), by_symbol)
        cells = setup_anndata(by_id, **SETUP)
        got = PerturbationPrior.from_cells(cells, by_id)
    spec = cells.spec
    assert spec.gene_names == IDS and spec.gene_symbol_column == "feature_name" and spec.gene_symbols == GENES
    assert spec.model_gene("G3") == IDS[3] and spec.model_gene(IDS[3]) == IDS[3] and spec.model_gene("G99") is None
    assert list(spec.var_frame()["feature_name"]) == GENES and list(spec.var_frame().index) == IDS
    ra, rb = ref.report()["pert"], got.report()["pert"]
    assert rb["n_seen"] == ra["n_seen"] and rb["n_fit"] == ra["n_fit"] and rb["self"] == ra["self"]
    assert rb["cv_sse"] == pytest.approx(ra["cv_sse"], rel=1e-5)
    for label in ("G25", "G3", "G25+G3"):  # unseen (its features found through its symbol), seen, a mix
        (ea, ca), (eb, cb) = ref.effect("pert", label), got.effect("pert", label)
        np.testing.assert_allclose(np.asarray(eb), np.asarray(ea), rtol=0, atol=1e-6)
        assert cb == pytest.approx(ca, abs=1e-6)
    assert got.describe("pert", "G25")["target_gene"] == IDS[25]
    # symbols off: the labels name no gene of the file, so nothing describes an unseen one
    off = setup_anndata(by_id, **SETUP, gene_symbols=None)
    assert off.spec.gene_symbol_column is None and PerturbationPrior.from_cells(off, by_id) is None


def test_design_targets_and_tf_networks_may_name_genes_by_symbol():
    from scidiff.tasks.design.attribution import tf_weight_matrix

    spec = setup_anndata(_by_id(_screen(), "gene_name"), **SETUP).spec
    target = PhenotypeTarget.parse("G3>=1,G5<=0.2," + IDS[7] + "=0.5", tolerance={"G3": 0.3})
    target.use_gene_ids(spec.model_gene).check(spec.gene_names)
    assert set(target.marker_genes) == {IDS[3]} and set(target.suppressed_genes) == {IDS[5]}
    assert set(target.gene_targets) == {IDS[7]} and target.tolerance_of(IDS[3]) == 0.3
    bad = PhenotypeTarget.parse("G3>=1,GX3<=0.2").use_gene_ids(spec.model_gene)
    with pytest.raises(ValueError, match=r"'GX3' \(close matches: G3"):
        bad.check(list(spec.gene_names) + spec.gene_symbols)
    network = pd.DataFrame({"source": ["TF1"] * 3, "target": ["G1", IDS[2], "NOT_MEASURED"], "weight": [1.0, -1, 1]})
    w, tfs, n_targets = tf_weight_matrix(network, spec.gene_names, min_targets=1, gene_symbols=spec.gene_symbols)
    genes = list(spec.gene_names)
    assert tfs == ["TF1"] and list(n_targets) == [2]  # G1 read as its ID, the unmeasured gene left out
    assert w[genes.index(IDS[1]), 0] == 1.0 and w[genes.index(IDS[2]), 0] == -1.0 and np.abs(w).sum() == 2


def test_train_and_predict_through_the_command_line_on_a_file_indexed_by_ids(tmp_path):
    from scidiff.cli import main

    by_id = _by_id(_screen(), "gene_name")
    by_id.write_h5ad(tmp_path / "ids.h5ad")
    by_id[by_id.obs["pert"] == "ctrl"][:30].copy().write_h5ad(tmp_path / "control.h5ad")
    config = tmp_path / "small.yaml"
    config.write_text("model: {hidden_dim: 16, num_layers: 1, latent_dim: 8, num_timesteps: 50}\n"
                      "training: {batch_size: 128, warmup_steps: 2}\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "ids.h5ad"), "--condition-keys", "line", "--perturbation-keys",
                 "pert", "--control-labels", "ctrl", "--config", str(config), "--epochs", "1", "--out", str(run)]) == 0
    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(run), "--data", str(tmp_path / "control.h5ad"), "--target", "pert=G30",
                 "--target", "pert=G1", "--steps", "3", "--out", str(out)]) == 0
    pred = ad.read_h5ad(out)
    assert list(pred.var_names) == IDS and list(pred.var["gene_name"]) == GENES
    routes = pred.obs.groupby("scidiff_target", observed=True)["scidiff_route"].agg(lambda r: set(r.astype(str)))
    assert routes["pert=G30"] == {"prior"} and routes["pert=G1"] == {"seen"}
    # design, with a target named by its symbol
    des = tmp_path / "des"
    assert main(["design", "--model", str(run), "--target", "G3<=0.1", "-n", "4", "--steps", "3",
                 "--out", str(des)]) == 0
    designed = ad.read_h5ad(f"{des}.h5ad")
    assert list(designed.var["gene_name"]) == GENES and f"met_{IDS[3]}<=0.1" in designed.obs
    genes = pd.read_csv(f"{des}.genes.tsv", sep="\t")
    assert set(genes["symbol"]) == set(GENES) and (genes.set_index("gene")["symbol"][IDS[3]] == "G3")


def test_evaluate_leaves_a_knockout_gene_out_by_its_symbol_on_a_file_indexed_by_ids():
    """A knockout's own gene is left out of the PDS (the project's and cell-eval's) through its
    symbol on a file indexed by ID, as on the file indexed by symbol: a prediction right in every
    gene but its own, which is far off, is ranked first (it would rank last with the gene in).
    The prediction holds fewer genes than the real file, and may name them by ID where the real file
    names them by symbol."""
    from scidiff.tasks.evaluate import evaluate_perturbation

    rng = np.random.default_rng(0)
    symbols, ids = [f"K{i}" for i in range(8)], [f"ENSG{i:011d}" for i in range(8)]
    labels = np.repeat(["ctrl", "K0", "K1", "K2"], 40)
    x = 2.0 + 0.01 * rng.normal(size=(len(labels), 8))
    x[labels == "K0", 0] -= 1.5
    x[labels == "K1", 1] -= 0.3
    x[labels == "K2", 2] -= 0.3
    x[labels == "K2", 4] += 0.2
    obs = pd.DataFrame({"pert": labels}, index=[f"c{i}" for i in range(len(labels))])
    pred_x = x[:, :7].copy()
    pred_x[labels == "K0", 0] += 5.0
    results = []
    for real_names, pred_names in ((symbols, symbols), (ids, ids), (symbols, ids)):  # the last: named unalike
        real = ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame({"gene_name": symbols}, index=real_names))
        pred = ad.AnnData(X=pred_x.astype(np.float32), obs=obs,
                          var=pd.DataFrame({"gene_name": symbols[:7]}, index=pred_names[:7]))
        results.append(evaluate_perturbation(real, pred, "pert", "ctrl", cell_eval="auto"))
    for out in results:
        assert out["per_perturbation"]["K0"]["pds_l1"] == 1.0
        if out["cell_eval"].get("installed"):
            assert out["cell_eval"]["prediction"]["per_perturbation"]["K0"]["discrimination_score_l1"] == 1.0


def test_cells_named_the_other_way_are_read_into_the_model_genes(tmp_path):
    """A model trained on a file indexed by ID reads cells indexed by symbol (scanpy's read_10x_h5),
    and a model indexed by symbol reads cells indexed by ID with a symbols column: the same values
    as from a file named like its own, in memory and streamed. Genes found neither way are named."""
    from scidiff.data import stream_like, transform_like

    by_symbol, by_id = _screen(), _by_id(_screen(), "gene_name")
    id_spec = setup_anndata(by_id, **SETUP).spec
    symbol_spec = setup_anndata(by_symbol, **SETUP).spec
    by_symbol.write_h5ad(tmp_path / "symbols.h5ad")
    by_id.write_h5ad(tmp_path / "ids.h5ad")
    for spec, own, other in ((id_spec, "ids", "symbols"), (symbol_spec, "symbols", "ids")):
        ref = transform_like(spec, by_id if own == "ids" else by_symbol).x
        got = transform_like(spec, by_symbol if own == "ids" else by_id).x
        np.testing.assert_array_equal(got.numpy(), ref.numpy())
        streamed = stream_like(spec, str(tmp_path / f"{other}.h5ad"))
        np.testing.assert_allclose(streamed.read_x(np.arange(50)).numpy(), ref[:50].numpy(), rtol=0, atol=1e-5)
    versioned = by_id.copy()  # GENCODE's IDs carry a version: matched to the model's unversioned ones
    versioned.var_names = [f"{g}.{i % 7 + 1}" for i, g in enumerate(IDS)]
    np.testing.assert_array_equal(transform_like(id_spec, versioned).x.numpy(),
                                  transform_like(id_spec, by_id).x.numpy())
    partial = by_symbol[:, GENES[:-1]].copy()  # one gene short: named as the file names genes
    with pytest.raises(KeyError, match=r"1 of the model's genes are not in the data: \['G39'\]"):
        transform_like(id_spec, partial)


def test_symbols_kept_in_var_beside_a_raw_that_holds_only_ids(tmp_path):
    """``.raw`` often keeps only the gene IDs while ``var`` has the symbols: --use-raw reads them
    from ``var`` for the genes both hold (in memory and streamed)."""
    base = _by_id(_screen())
    adata = ad.AnnData(X=base.X.astype(np.float32), obs=base.obs, var=pd.DataFrame(index=IDS))
    adata.raw = adata.copy()  # raw: IDs only
    adata = adata[:, IDS[:35]].copy()  # var: fewer genes, with their symbols
    adata.var["feature_name"] = GENES[:35]
    spec = setup_anndata(adata, use_raw=True, **SETUP).spec
    assert spec.gene_symbol_column == "feature_name" and spec.gene_symbols == GENES[:35] + [""] * 5
    adata.write_h5ad(tmp_path / "raw.h5ad")
    streamed = setup_streaming(str(tmp_path / "raw.h5ad"), use_raw=True, hvg_cells=10**9, **SETUP).spec
    assert streamed.gene_symbols == spec.gene_symbols


def test_generated_cells_named_by_id_are_scored_against_real_cells_named_by_symbol(tmp_path):
    from scidiff.tasks.evaluate import evaluate_files

    real = _screen()[:400].copy()
    generated = _screen()[400:700].copy()
    by_id = _by_id(generated, "gene_name")
    same = evaluate_files(real, generated, tmp_path / "a", plots=False)
    crossed = evaluate_files(real, by_id, tmp_path / "b", plots=False)
    for key in ("mmd", "energy_distance", "fid", "classifier_auc", "mean_correlation", "gene_correlation"):
        assert crossed[key] == pytest.approx(same[key])
    with pytest.raises(KeyError, match=r"1 genes of the generated file are not in the real file: \['G39'\]"):
        evaluate_files(real[:, GENES[:-1]].copy(), by_id, tmp_path / "c", plots=False)


def test_a_model_of_ids_without_symbols_reads_cells_named_by_symbol_with_their_ids():
    """A model trained on a file indexed by ID with no symbols column could not read cells indexed
    by symbol with their IDs in ``var['gene_ids']`` (scanpy's read_10x_h5): "40 of the model's
    genes are not in the data". Now the ID column is read (versioned IDs too), giving the same
    values as the file indexed by ID."""
    from scidiff.data import transform_like

    by_id = _screen()
    by_id.var = pd.DataFrame(index=IDS)  # IDs only: the model records no symbols
    spec = setup_anndata(by_id, **SETUP).spec
    assert not spec.gene_symbols or not any(spec.gene_symbols)
    ref = transform_like(spec, by_id).x.numpy()
    for ids in (IDS, [f"{g}.{i % 5 + 1}" for i, g in enumerate(IDS)]):
        by_symbol = _screen()[:, ::-1].copy()  # and in another order
        by_symbol.var["gene_ids"] = ids[::-1]
        np.testing.assert_array_equal(transform_like(spec, by_symbol).x.numpy(), ref)
