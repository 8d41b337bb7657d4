"""Multimodal 10x files: only RNA is modelled, the same in memory, streamed and at prediction time.

CITE-seq (``Antibody Capture``), Perturb-seq (``CRISPR Guide Capture``), hashtags (``Multiplexing
Capture``) and multiome (``Peaks``) files carry other features beside ``Gene Expression`` in one
matrix, named by ``var['feature_types']`` (scanpy's ``read_10x_h5(gex_only=False)``) or the 10x
``.h5``'s ``features/feature_type``. Checked here: those features are never chosen as genes nor
counted in library sizes (the cells equal an RNA-only file's exactly), one warning names the file,
the feature types and their counts, a file without Gene Expression is an error naming it, the
streamed set-up picks the same genes and normalisation as the in-memory one, prediction and
evaluation read the same genes (``expression_as_x``, ``transform_like``), a 10x ``.h5``'s dropped
features are said, and scvi-tools' ``obsm['protein_expression']`` is ignored without a word.
"""
from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scidiff
from scidiff.data.io import read_h5ad
from scidiff.data.preprocess import expression_as_x
from scidiff.data.stream_setup import setup_streaming

N_CELLS, N_GENES = 120, 30
GENES = [f"G{i}" for i in range(N_GENES)]
OTHER = {"Antibody Capture": ["CD3_TotalSeqB", "CD4_TotalSeqB", "CD19_TotalSeqB"],
         "CRISPR Guide Capture": ["G1-sg1", "NTC-sg1"], "Multiplexing Capture": ["HTO1"]}


def _counts(seed: int = 0):
    """RNA counts (tens per cell) and other features' counts in the thousands, the ADTs varying
    most between cells (they would top the dispersion ranking and the library sizes)."""
    rng = np.random.default_rng(seed)
    rna = rng.poisson(rng.gamma(2.0, 1.0, (1, N_GENES)) * rng.uniform(0.5, 2.0, (N_CELLS, 1)), (N_CELLS, N_GENES))
    rna[:, 0] += 1  # every cell has RNA
    n_other = sum(map(len, OTHER.values()))
    other = rng.negative_binomial(3, 0.002, (N_CELLS, n_other)) * rng.integers(1, 20, (N_CELLS, 1))
    return rna.astype(np.float32), other.astype(np.float32)


def _multimodal(dense: bool = False, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """A multimodal AnnData (RNA, then ADTs, guides, a hashtag) and its RNA-only twin."""
    rna, other = _counts(seed)
    obs = pd.DataFrame({"perturbation": np.array(["control", "G1", "G2"])[np.arange(N_CELLS) % 3]},
                       index=[f"c{i}" for i in range(N_CELLS)])
    types = ["Gene Expression"] * N_GENES + [t for t, names in OTHER.items() for _ in names]
    var = pd.DataFrame({"feature_types": types}, index=GENES + [n for names in OTHER.values() for n in names])
    x = np.hstack([rna, other])
    both = ad.AnnData(x if dense else sp.csr_matrix(x), obs=obs, var=var)
    alone = ad.AnnData(rna if dense else sp.csr_matrix(rna), obs=obs.copy(),
                       var=pd.DataFrame({"feature_types": ["Gene Expression"] * N_GENES}, index=GENES))
    return both, alone


WARNING = ("left out 3 'Antibody Capture', 2 'CRISPR Guide Capture', 1 'Multiplexing Capture' feature(s) of 36: "
           "only the 30 'Gene Expression' features are modelled")


def _left_out(record) -> list[str]:
    return [str(w.message) for w in record if "left out" in str(w.message)]


def test_cite_seq_anndata_models_rna_alone_with_one_warning(tmp_path):
    both, alone = _multimodal()
    path = str(tmp_path / "cite.h5ad")
    both.write_h5ad(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = scidiff.setup_anndata(path, n_top_genes=10, perturbation_keys=["perturbation"],
                                     condition_keys=["perturbation"])
    ref = scidiff.setup_anndata(alone, n_top_genes=10, perturbation_keys=["perturbation"],
                                condition_keys=["perturbation"])
    assert data.spec.gene_names == ref.spec.gene_names  # no ADT, guide or hashtag among the genes
    assert set(data.spec.gene_names) <= set(GENES)
    np.testing.assert_array_equal(data.x.numpy(), ref.x.numpy())  # library sizes of RNA alone
    assert _left_out(record) == [f"X of {path!r}: {WARNING} (genes chosen and cells normalised on them)"]


def test_streamed_setup_equals_in_memory_on_a_multimodal_file(tmp_path):
    for dense in (False, True):
        both, alone = _multimodal(dense=dense, seed=1)
        path = str(tmp_path / f"cite_{dense}.h5ad")
        both.write_h5ad(path)
        ref = scidiff.setup_anndata(alone, n_top_genes=10)
        for backend in ("auto", "python"):
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                cells = setup_streaming(path, n_top_genes=10, hvg_cells=10 ** 6, backend=backend)
            assert cells.spec.gene_names == ref.spec.gene_names, (dense, backend)
            assert cells.spec.target_sum == ref.spec.target_sum
            np.testing.assert_allclose(cells.read_x(np.arange(N_CELLS)).numpy(), ref.x.numpy(), atol=1e-4)
            assert _left_out(record) == [f"X of {path!r}: {WARNING} (genes chosen and cells normalised on them)"]
            cells.reader.close()


def test_prediction_and_evaluation_read_the_same_genes(tmp_path):
    both, alone = _multimodal(seed=2)
    model_cells = scidiff.setup_anndata(alone, n_top_genes=10)
    with pytest.warns(UserWarning, match="left out 3 'Antibody Capture'"):
        new = scidiff.data.dataset.transform_like(model_cells.spec, both)
    np.testing.assert_array_equal(new.x.numpy(), model_cells.x.numpy())
    with pytest.warns(UserWarning, match="left out 3 'Antibody Capture'"):
        as_x = expression_as_x(both)  # what predict's baselines and evaluate read
    assert list(as_x.var_names) == GENES
    np.testing.assert_array_equal(as_x.X.toarray(), alone.X.toarray())
    path = str(tmp_path / "cite.h5ad")
    both.write_h5ad(path)
    with pytest.warns(UserWarning, match="left out 3 'Antibody Capture'"):
        streamed = scidiff.data.stream_setup.stream_like(model_cells.spec, path)
    np.testing.assert_allclose(streamed.read_x(np.arange(N_CELLS)).numpy(), model_cells.x.numpy(), atol=1e-4)


def _write_10x(path: str, x: sp.csr_matrix, names: list[str], types: list[str]) -> None:
    """A Cell Ranger v3 ``.h5`` (``matrix`` group, features x cells stored as CSC)."""
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array([f"AAAC{i:06d}-1" for i in range(x.shape[0])], "S")
        m["data"], m["indices"] = x.data.astype(np.int32), x.indices.astype(np.int64)
        m["indptr"], m["shape"] = x.indptr.astype(np.int64), np.array([x.shape[1], x.shape[0]], np.int32)
        features = m.create_group("features")
        features["id"] = np.array([f"ENSG{i:05d}" for i in range(len(names))], "S")
        features["name"], features["feature_type"] = np.array(names, "S"), np.array(types, "S")
        features["genome"] = np.array(["GRCh38"] * len(names), "S")
        features["_all_tag_keys"] = np.array(["genome"], "S")


def test_10x_h5_says_which_features_it_leaves_out(tmp_path, capsys):
    rna, other = _counts(seed=3)
    names = GENES + ["G1"] + [f"OTHER{i}" for i in range(other.shape[1] - 1)]  # an ADT named as a gene
    types = ["Gene Expression"] * N_GENES + ["Antibody Capture"] * 3 + ["CRISPR Guide Capture"] * 2 + ["Peaks"]
    path = str(tmp_path / "cite_screen.h5")
    _write_10x(path, sp.csr_matrix(np.hstack([rna, other])), names, types)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        adata = read_h5ad(path)
    assert list(adata.var_names) == GENES  # the gene G1 not renamed G1-1 by the ADT of its name
    np.testing.assert_array_equal(adata.X.toarray(), rna)
    assert _left_out(record) == [f"{path!r}: left out 3 'Antibody Capture', 2 'CRISPR Guide Capture', 1 'Peaks' "
                                 f"feature(s) of 36: only the 30 'Gene Expression' features are modelled (genes "
                                 f"chosen and cells normalised on them)"]
    assert "made unique" not in capsys.readouterr().err


def test_no_gene_expression_is_an_error_naming_the_file(tmp_path):
    _, other = _counts(seed=4)
    types = ["Antibody Capture"] * 3 + ["Peaks"] * 3
    adata = ad.AnnData(sp.csr_matrix(other), var=pd.DataFrame({"feature_types": types},
                                                              index=[f"F{i}" for i in range(6)]))
    path = str(tmp_path / "adt_only.h5ad")
    adata.write_h5ad(path)
    message = rf"X of '{path}' has no 'Gene Expression' feature \(its feature types: 3 'Antibody Capture', 3 'Peaks'\)"
    with pytest.raises(ValueError, match=message):
        scidiff.setup_anndata(path, n_top_genes=None)
    with pytest.raises(ValueError, match=message):
        setup_streaming(path, n_top_genes=None)
    h5 = str(tmp_path / "adt_only.h5")
    _write_10x(h5, sp.csr_matrix(other), [f"F{i}" for i in range(6)], types)
    with pytest.raises(ValueError, match=rf"'{h5}' has no 'Gene Expression' feature"):
        read_h5ad(h5)


def test_protein_in_obsm_is_ignored_without_a_word(tmp_path):
    _, alone = _multimodal(seed=5)
    with_protein = alone.copy()
    with_protein.obsm["protein_expression"] = _counts(seed=5)[1][:, :3]  # scvi-tools' convention
    path = str(tmp_path / "protein_obsm.h5ad")
    with_protein.write_h5ad(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = scidiff.setup_anndata(path, n_top_genes=10)
        cells = setup_streaming(path, n_top_genes=10, hvg_cells=10 ** 6)
    ref = scidiff.setup_anndata(alone, n_top_genes=10)
    assert data.spec.gene_names == cells.spec.gene_names == ref.spec.gene_names
    np.testing.assert_array_equal(data.x.numpy(), ref.x.numpy())
    assert _left_out(record) == []
    cells.reader.close()


def test_a_baseline_of_measured_multimodal_cells_is_scored_on_rna_alone(tmp_path):
    """``scidiff evaluate --perturbation --baseline NAME=FILE``: a baseline of measured counts
    (the real cells themselves, with their ADTs, guides, hashtag) was normalised over every
    feature, its RNA ~100 times too low (MSE 12.3 against itself in a Perturb-seq example)."""
    from scidiff.tasks.evaluate import evaluate_perturbation

    both, alone = _multimodal(seed=6)
    path = str(tmp_path / "measured.h5ad")
    both.write_h5ad(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scores = evaluate_perturbation(alone, alone, "perturbation", baselines={"measured": path},
                                       out_dir=str(tmp_path / "eval"), cell_eval=False)
    ours = scores["mean"]
    theirs = scores["baselines"]["measured"]["mean"]
    assert theirs["rmse_all"] == ours["rmse_all"] == 0.0
    assert theirs == ours
    assert _left_out(record) == [f"X of {path!r}: {WARNING} (genes chosen and cells normalised on them)"]


def test_a_streamed_screen_indexed_by_id_keeps_its_symbols_and_its_perturbation_prior(tmp_path):
    """A Perturb-seq file indexed by gene ID with a symbols column and guides beside the genes,
    perturbation labels naming genes by symbol: streamed, its ``var`` (read for the symbols) held
    the guides too, did not line up with the genes read, and the prior was silently dropped
    (``perturbation prior: none``) where the same file in memory, or without guides, had one."""
    from scidiff.data.stream_setup import read_var
    from scidiff.models.perturbation_prior import PerturbationPrior

    both, _ = _multimodal(seed=7)
    both.var["gene_symbols"] = list(both.var_names)
    both.var_names = [f"ENSG{i:05d}" for i in range(both.n_vars)]
    path = str(tmp_path / "screen_ids.h5ad")
    both.write_h5ad(path)
    keys = dict(n_top_genes=None, perturbation_keys=["perturbation"], condition_keys=["perturbation"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = setup_streaming(path, hvg_cells=10 ** 6, **keys)
        memory = scidiff.setup_anndata(path, **keys)
        assert list(read_var(path).index) == cells.reader.var_names == [f"ENSG{i:05d}" for i in range(N_GENES)]
        streamed_prior = PerturbationPrior.from_streamed(cells)
        memory_prior = PerturbationPrior.from_cells(memory, scidiff.data.read_h5ad(path))
    assert memory_prior is not None and streamed_prior is not None
    assert streamed_prior.genes == memory_prior.genes
    cells.reader.close()


def test_raw_with_adts_is_read_as_rna_alone_and_raw_genes_without_a_type_are_kept(tmp_path):
    """``.raw`` holding every feature (``adata.raw = adata`` before subsetting ``X``) drops its
    ADTs under ``use_raw`` in memory and streamed; a ``.raw`` with no feature types of its own
    takes ``var``'s for the genes both hold, and its other genes (no type said) stay genes."""
    both, alone = _multimodal(seed=8)
    adata = both[:, :10].copy()
    adata.raw = both
    path = str(tmp_path / "raw_cite.h5ad")
    adata.write_h5ad(path)
    ref = scidiff.setup_anndata(alone, n_top_genes=10)
    with pytest.warns(UserWarning, match=r"raw/X of .*left out 3 'Antibody Capture'"):
        data = scidiff.setup_anndata(path, n_top_genes=10, use_raw=True)
    with pytest.warns(UserWarning, match=r"raw/X of .*left out 3 'Antibody Capture'"):
        cells = setup_streaming(path, n_top_genes=10, use_raw=True, hvg_cells=10 ** 6)
    assert data.spec.gene_names == cells.spec.gene_names == ref.spec.gene_names
    np.testing.assert_array_equal(data.x.numpy(), ref.x.numpy())
    cells.reader.close()
    untyped = alone[:, :10].copy()
    untyped.raw = ad.AnnData(alone.X, obs=alone.obs, var=pd.DataFrame(index=GENES))  # raw.var: no types
    path = str(tmp_path / "raw_untyped.h5ad")
    untyped.write_h5ad(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = scidiff.setup_anndata(path, n_top_genes=None, use_raw=True)
        cells = setup_streaming(path, n_top_genes=None, use_raw=True)
    assert data.spec.gene_names == cells.spec.gene_names == GENES
    assert _left_out(record) == []
    cells.reader.close()
