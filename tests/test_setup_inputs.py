"""setup_anndata and transform_like on the obs columns and gene lists users really have: each input
that cannot be used is a ValueError/KeyError naming the key, label or gene; the rest gives the
right result."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scidiff.data import setup_anndata, transform_like

N, G = 120, 20


def cells(ids: bool = False, **obs) -> ad.AnnData:
    x = np.random.default_rng(0).poisson(2.0, size=(N, G)).astype(np.float32)
    adata = ad.AnnData(X=x)
    adata.obs_names = [f"c{i}" for i in range(N)]
    if ids:
        adata.var_names = [f"ENSG{i:011d}" for i in range(G)]
        adata.var["gene_name"] = [f"G{i}" for i in range(G)]
    else:
        adata.var_names = [f"G{i}" for i in range(G)]
    for key, values in obs.items():
        adata.obs[key] = values
    return adata


def rep(labels) -> np.ndarray:
    return np.array(list(labels) * (N // len(labels)), dtype=object)


SCREEN = rep(["ctrl", "A", "B", "A+B"])


def test_a_key_both_categorical_and_numeric_is_refused_by_name():
    adata = cells(day=np.arange(N) % 3, drug=SCREEN)
    with pytest.raises(ValueError, match=r"\['day'\] are given both as categorical"):
        setup_anndata(adata, n_top_genes=None, condition_keys=["day"], continuous_keys=["day"])
    with pytest.raises(ValueError, match=r"\['drug'\] are given both as categorical"):
        setup_anndata(adata, n_top_genes=None, perturbation_keys=["drug"], dose_key="drug")


def test_dose_key_is_one_column_name():
    adata = cells(drug=SCREEN, dose=rep([0.0, 1.0, 10.0, 10.0]).astype(float))
    with pytest.raises(ValueError, match=r"dose_key names one obs column \(a string\), got \['dose'\]"):
        setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", dose_key=["dose"])


def test_a_negative_dose_is_refused_at_setup():
    adata = cells(drug=SCREEN, dose=rep([0.0, -1.0, 10.0, 10.0]).astype(float))
    with pytest.raises(ValueError, match=r"obs\['dose'\] \(the dose_key\) holds negative doses in 30 cells \(-1\)"):
        setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", dose_key="dose")
    adata.obs["dose"] = rep([0.0, 1.0, 10.0, 10.0]).astype(float)
    spec = setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", dose_key="dose").spec
    assert spec.continuous_range["dose"] == [0.0, 10.0]


def test_undosed_control_cells_are_told_to_take_dose_zero():
    adata = cells(drug=SCREEN, dose=rep([np.nan, 1.0, 10.0, 10.0]).astype(float))
    with pytest.raises(ValueError, match=r"no dose for 30 cells, all of them control cells: a control cell's dose"):
        setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", dose_key="dose")
    adata.obs["dose"] = rep([1.0, np.nan, 10.0, 10.0]).astype(float)  # perturbed cells without a dose: as before
    with pytest.raises(ValueError, match=r"obs\['dose'\] of the AnnData must be numeric and finite: 30 cells"):
        setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", dose_key="dose")


@pytest.mark.parametrize("bad", [10.5, "10", True])
def test_n_top_genes_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match=r"n_top_genes must be a whole number of genes .*got " + repr(bad)):
        setup_anndata(cells(), n_top_genes=bad)


def test_n_top_genes_as_a_float_of_a_whole_number():
    ten = setup_anndata(cells(), n_top_genes=10).spec.gene_names
    assert len(ten) == 10 and setup_anndata(cells(), n_top_genes=10.0).spec.gene_names == ten
    assert setup_anndata(cells(), n_top_genes=1000).spec.n_genes == G  # more than the file has: all


def test_an_empty_gene_list_or_a_mask_is_refused():
    with pytest.raises(ValueError, match="genes= is an empty list"):
        setup_anndata(cells(), genes=[])
    adata = cells()
    adata.var["highly_variable"] = np.arange(G) < 5
    with pytest.raises(ValueError, match="genes= takes gene names, got a boolean mask of 20 values"):
        setup_anndata(adata, genes=adata.var["highly_variable"])


def test_genes_by_symbol_where_the_file_is_indexed_by_id():
    adata = cells(ids=True)
    spec = setup_anndata(adata, genes=["G3", "ENSG00000000001"]).spec
    assert spec.gene_names == ["ENSG00000000003", "ENSG00000000001"]
    assert spec.gene_symbols == ["G3", "G1"]
    with pytest.raises(ValueError, match=r"more than once \(by ID or symbol\): \['ENSG00000000003'\]"):
        setup_anndata(adata, genes=["G3", "ENSG00000000003"])
    with pytest.raises(KeyError, match=r"not in the data: \['NOPE'\]"):
        setup_anndata(adata, genes=["G3", "NOPE"])


def test_duplicated_genes_in_the_list_are_named():
    with pytest.raises(ValueError, match=r"more than once .*\['G1'\]"):
        setup_anndata(cells(), genes=["G1", "G2", "G1"])


def test_labels_written_two_ways_are_warned_about():
    adata = cells(cell_type=rep(["B cell", "B cell ", "Café", "Cafe\u0301"]))
    with pytest.warns(UserWarning, match=r"2 label\(s\) are written in more than one way"):
        data = setup_anndata(adata, n_top_genes=None, condition_keys="cell_type")
    assert len(data.spec.categorical["cell_type"]) == 4  # read as given, each its own condition
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_anndata(cells(cell_type=rep(["B cell", "T cell"])), n_top_genes=None, condition_keys="cell_type")


def test_a_constant_numeric_key_is_warned_about():
    with pytest.warns(UserWarning, match=r"obs\['day'\] of the AnnData has one value \(3\) for every cell"):
        setup_anndata(cells(day=np.full(N, 3.0)), n_top_genes=None, continuous_keys="day")


def test_transform_like_condition_keys_as_one_string_and_unknown_keys():
    adata = cells(cell_type=rep(["B", "T"]), donor=rep(["d1", "d2", "d3"]))
    spec = setup_anndata(adata, n_top_genes=None, condition_keys=["cell_type", "donor"]).spec
    assert set(transform_like(spec, adata, condition_keys="cell_type").covariates) == {"cell_type"}
    with pytest.raises(KeyError, match=r"condition key\(s\) \['batch'\] are not covariates of the model"):
        transform_like(spec, adata, condition_keys=["batch"])
    with pytest.raises(KeyError, match=r"obs key\(s\) \['donor'\] not in the AnnData"):
        transform_like(spec, cells(cell_type=rep(["B", "T"])), condition_keys=["cell_type", "donor"])


def test_an_integer_label_read_back_as_float_is_suggested():
    spec = setup_anndata(cells(batch=np.arange(N) % 3), n_top_genes=None, condition_keys="batch").spec
    assert spec.categorical["batch"] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"values the model does not know: \['0.0', '1.0', '2.0'\].*did you mean '0'"):
        transform_like(spec, cells(batch=(np.arange(N) % 3).astype(float)))


def test_obs_columns_biologists_have_are_read_right():
    adata = cells(stim=np.array([True, False] * (N // 2)), batch=np.arange(N) % 12,
                  ct=pd.Categorical(rep(["T", "B"]), categories=["NK", "B", "T"]),
                  drug=rep([" ctrl ", "A ", "B", "A + B"]), day=pd.Categorical(rep([0, 2, 4, 4])))
    data = setup_anndata(adata, n_top_genes=None, condition_keys=["stim", "batch", "ct"], perturbation_keys="drug",
                         control_labels="ctrl", continuous_keys="day")
    spec = data.spec
    assert spec.categorical["stim"] == ["False", "True"]
    assert data.covariates["stim"][:2].tolist() == [1, 0]
    assert spec.categorical["ct"] == ["B", "T"]  # unused categories dropped
    assert spec.label_counts["batch"] == {str(i): 10 for i in range(12)}
    assert spec.categorical["drug"] == ["A", "B"]
    assert spec.label_counts["drug"] == {"ctrl": 30, "A": 30, "B": 30, "A+B": 30}
    assert spec.continuous_range["day"] == [0.0, 4.0]
    assert data.covariates["day"][:4].tolist() == [0.0, 2.0, 4.0, 4.0]


def test_none_for_keys_is_no_keys_as_in_scvi_tools():
    adata = cells(cell_type=rep(["B", "T"]))
    data = setup_anndata(adata, n_top_genes=None, condition_keys=None, continuous_keys=None, perturbation_keys=None)
    assert data.spec.categorical == {} and data.spec.continuous == [] and data.covariates == {}
    spec = setup_anndata(cells(drug=SCREEN), n_top_genes=None, perturbation_keys="drug", control_labels=None).spec
    assert spec.control_labels == ["control", "ctrl"] and spec.categorical["drug"] == ["A", "B"]


@pytest.mark.parametrize("controls", [0, [0], ["0"], np.int64(0)])
def test_a_numeric_control_label_names_the_control_cells(controls):
    adata = cells(guide=np.arange(N) % 3)  # guide 0: the unperturbed cells
    data = setup_anndata(adata, n_top_genes=None, perturbation_keys="guide", control_labels=controls)
    assert data.spec.control_labels == ["0"]
    assert data.spec.categorical["guide"] == ["1", "2"]
    assert data.spec.label_counts["guide"] == {"0": 40, "1": 40, "2": 40}
    assert data.covariates["guide"][0].tolist() == [0.0, 0.0, 0.0]  # no perturbation


def test_a_control_label_given_with_spaces_matches_the_stripped_labels():
    spec = setup_anndata(cells(drug=SCREEN), n_top_genes=None, perturbation_keys="drug", control_labels=[" ctrl "]).spec
    assert spec.control_labels == ["ctrl"] and spec.categorical["drug"] == ["A", "B"]


@pytest.mark.parametrize("separator", ["", None])
def test_an_empty_separator_is_refused_by_name(separator):
    with pytest.raises(ValueError, match=r"separator .* must be a non-empty string, got " + repr(separator)):
        setup_anndata(cells(drug=SCREEN), n_top_genes=None, perturbation_keys="drug", separator=separator)


def test_missing_values_written_as_text_are_warned_about():
    adata = cells(drug=rep(["ctrl", "A", "nan", "B"]), donor=rep(["d1", "None"]))
    with pytest.warns(UserWarning) as record:
        setup_anndata(adata, n_top_genes=None, condition_keys="donor", perturbation_keys="drug")
    text = [str(w.message) for w in record]
    assert any("obs['drug'] of the AnnData holds 'nan' (30 cells): a missing value written as text" in t for t in text)
    assert any("obs['donor'] of the AnnData holds 'None' (60 cells)" in t for t in text)


def test_a_key_listed_twice_is_one_covariate():
    adata = cells(drug=SCREEN, day=np.arange(N) % 3 * 1.0, ct=rep(["B", "T"]))
    spec = setup_anndata(adata, n_top_genes=None, condition_keys=["ct", "ct", "drug"], continuous_keys=["day", "day"],
                         perturbation_keys=["drug", "drug"]).spec
    assert list(spec.categorical) == ["ct", "drug"] and spec.continuous == ["day"]
    assert spec.perturbation_keys == ["drug"]


def test_undosed_control_cells_given_to_a_model_are_told_to_take_dose_zero():
    adata = cells(drug=SCREEN, dose=rep([0.0, 1.0, 10.0, 10.0]).astype(float))
    spec = setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", dose_key="dose").spec
    adata.obs["dose"] = rep([np.nan, 1.0, 10.0, 10.0]).astype(float)
    with pytest.raises(ValueError, match=r"no dose for 30 cells, all of them control cells"):
        transform_like(spec, adata)


def test_a_streamed_set_up_reads_its_arguments_as_the_in_memory_one(tmp_path):
    """setup_streaming mapped its arguments apart from setup_anndata: condition_keys=None, n_top_genes=10.0,
    separator=None and control_labels=0 were TypeErrors, genes=[] a model of no genes."""
    import scipy.sparse as sp

    from scidiff.data import setup_streaming
    rng = np.random.default_rng(0)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, (200, 20)).astype(np.float32)),
                   obs=pd.DataFrame({"p": ["ctrl", "A", "B", "A+B"] * 50}, index=[f"c{i}" for i in range(200)]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))
    path = tmp_path / "s.h5ad"
    a.write_h5ad(path)
    assert setup_streaming(path, n_top_genes=None, condition_keys=None).spec.categorical == {}
    assert setup_streaming(path, n_top_genes=10.0).spec.n_genes == 10
    with pytest.raises(ValueError, match="separator"):
        setup_streaming(path, n_top_genes=None, perturbation_keys="p", separator=None)
    with pytest.raises(ValueError, match="genes= is an empty list"):
        setup_streaming(path, n_top_genes=None, genes=[])
    with pytest.raises(ValueError, match=r"carries a control label \['0'\]"):  # read as the label '0' (a TypeError)
        setup_streaming(path, n_top_genes=None, perturbation_keys="p", control_labels=0)


def test_an_empty_perturbation_label_is_missing_not_control(tmp_path):
    """Cells whose perturbation label is '' (or blank) were counted as control cells, silently (a
    screen's cells without a detected guide joined the controls), where NaN is refused. Now both
    are refused alike, in memory and streamed, and the two ways out the error gives work."""
    from scidiff.data import setup_streaming

    labels = SCREEN.copy()
    labels[:3], labels[4] = "", "  "
    adata = cells(drug=pd.Categorical(labels))
    message = r"obs\['drug'\] of .* has 4 missing values \(4 of them empty labels\) \(cells \['c0', 'c1', 'c2'\]"
    with pytest.raises(ValueError, match=message):
        setup_anndata(adata, n_top_genes=None, perturbation_keys="drug", control_labels="ctrl")
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(ValueError, match=message.replace("of .*", "of '.*screen.h5ad'")):
        setup_streaming(path, n_top_genes=None, perturbation_keys="drug", control_labels="ctrl")
    # the error's own code: drop them, or call them control
    kept = adata[adata.obs["drug"].fillna("").astype(str).str.strip() != ""].copy()
    counts = setup_anndata(kept, n_top_genes=None, perturbation_keys="drug", control_labels="ctrl").spec.label_counts
    assert counts["drug"]["ctrl"] == 30 - 2  # c0 and c4 were control-labelled rows of SCREEN's cycle
    filled = adata.copy()
    filled.obs["drug"] = filled.obs["drug"].astype(object).fillna("").replace(r"^\s*$", "ctrl",
                                                                              regex=True).astype("category")
    counts = setup_anndata(filled, n_top_genes=None, perturbation_keys="drug", control_labels="ctrl").spec.label_counts
    assert counts["drug"]["ctrl"] == 30 - 2 + 4  # the four blank cells join them
    # a plain covariate's '' stays a label of its own
    assert "" in setup_anndata(cells(batch=labels), n_top_genes=None, condition_keys="batch").spec.categorical["batch"]


def test_counts_of_only_the_models_genes_are_named():
    """A file of only the model's 20 genes (of the 60 it was trained among) normalised each cell by
    the total of those 20 alone: every log1p value too high (by log 3 here), silently. Now a
    warning says so; the cells with all their genes give none."""
    x = np.random.default_rng(1).poisson(2.0, size=(N, 60)).astype(np.float32)
    adata = ad.AnnData(X=x)
    adata.obs_names = [f"c{i}" for i in range(N)]
    adata.var_names = [f"G{i}" for i in range(60)]
    spec = setup_anndata(adata, genes=[f"G{i}" for i in range(20)]).spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = transform_like(spec, adata)
    with pytest.warns(UserWarning, match=r"hold 3(\.\d)? times the training cells' share of their counts on the "
                                         r"model's genes"):
        part = transform_like(spec, adata[:, :20].copy())
    assert float((part.log_expression() - whole.log_expression()).mean()) > 0.5  # what the warning is about
