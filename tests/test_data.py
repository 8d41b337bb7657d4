import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scidiff.data import DataSpec, detect_input, log_normalize, read_h5ad, setup_anndata, transform_like


def test_normalisation_matches_scanpy(kang):
    import scanpy as sc

    counts = kang.layers["counts"]
    for target_sum in (1e4, None):
        ours, used = log_normalize(counts, target_sum)
        ref = ad.AnnData(X=counts.copy())
        sc.pp.normalize_total(ref, target_sum=target_sum)
        sc.pp.log1p(ref)
        np.testing.assert_allclose(ours.toarray(), ref.X.toarray(), rtol=1e-5, atol=1e-6)
        totals = np.asarray(counts.sum(1)).ravel()
        assert used == pytest.approx(1e4 if target_sum else float(np.median(totals)))
    dense_ours, _ = log_normalize(counts.toarray(), 1e4)
    np.testing.assert_allclose(dense_ours, log_normalize(counts, 1e4)[0].toarray(), rtol=1e-6)


def test_detect_input_kinds(kang):
    assert detect_input(kang.layers["counts"], "counts") == "counts"
    assert detect_input(kang.X, "X") == "log1p"
    with pytest.raises(ValueError, match="non-integer"):
        detect_input(kang.X, "X of kang", "counts")


def test_setup_reads_counts_and_selects_hvgs(kang_small):
    import scanpy as sc

    data = setup_anndata(kang_small, layer="counts", n_top_genes=200, condition_keys=["cell_type", "condition"])
    assert data.spec.input_kind == "counts" and data.spec.target_sum == 1e4
    ref = kang_small.copy()
    ref.X = ref.layers["counts"].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=200, flavor="seurat")
    assert data.spec.gene_names == list(ref.var_names[ref.var["highly_variable"]])
    expected = ref[:, data.spec.gene_names].X.toarray()
    np.testing.assert_allclose(data.log_expression(), expected, rtol=1e-5, atol=1e-5)
    # global scaling: per-gene centring, one shared scale
    assert len(set(data.spec.gene_scale)) == 1
    np.testing.assert_allclose(data.x.numpy().mean(0), 0, atol=1e-4)
    assert sorted(data.spec.categorical["condition"]) == ["control", "stimulated"]
    assert set(data.covariates) == {"cell_type", "condition"}


def test_transform_like_brings_new_cells_into_the_same_space(kang_small, kang):
    data = setup_anndata(kang_small, n_top_genes=100, condition_keys=["cell_type"])
    other = transform_like(data.spec, kang[:50])
    np.testing.assert_allclose(other.log_expression(), kang[:50, data.spec.gene_names].X.toarray(), atol=1e-5)
    assert torch.equal(other.covariates["cell_type"],
                       torch.tensor([data.spec.categorical["cell_type"].index(c) for c in kang.obs.cell_type[:50]]))


def test_loader_visits_every_cell_once_and_is_reproducible(kang_small):
    data = setup_anndata(kang_small, n_top_genes=50, condition_keys=["cell_type"])
    seen = [b["x"] for b in data.loader(batch_size=64, seed=3)]
    assert [len(b) for b in seen] == [64, 64, 64, 64, 44]
    allx = torch.cat(seen)
    rows = lambda m: m.numpy()[np.lexsort(m.numpy().T[::-1])]
    np.testing.assert_array_equal(rows(allx), rows(data.x))  # the same cells, each once
    assert not torch.equal(allx, data.x)  # in shuffled order
    again = torch.cat([b["x"] for b in data.loader(batch_size=64, seed=3)])
    torch.testing.assert_close(allx, again)


def test_spec_round_trip_and_condition_encoding():
    spec = DataSpec(gene_names=["A", "B"], categorical={"cell_type": ["B", "T"]}, continuous=["dose"])
    again = DataSpec.from_dict(spec.to_dict())
    assert again == spec
    codes = spec.encode_conditions({"cell_type": "T", "dose": 2.0}, 3)
    assert codes["cell_type"].tolist() == [1, 1, 1] and codes["dose"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match=r"unknown value 'NK' for condition 'cell_type'; known values: \['B', 'T'\]"):
        spec.encode_conditions({"cell_type": "NK"}, 1)
    with pytest.raises(KeyError, match="unknown condition key 'drug'"):
        spec.encode_conditions({"drug": "x"}, 1)


# -- bad input: each error names the file, key or gene -------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5ad"
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        read_h5ad(path)
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        setup_anndata(str(path))


def test_not_an_h5ad(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="bad.h5ad"):
        read_h5ad(bad)


def test_missing_obs_key_lists_available(kang_small):
    with pytest.raises(KeyError, match=r"obs key\(s\) \['drug'\].*available obs keys: \[.*'cell_type'"):
        setup_anndata(kang_small, condition_keys=["drug"], n_top_genes=50)


def test_missing_layer_lists_layers(kang_small):
    with pytest.raises(KeyError, match=r"layer 'spliced'.*layers available: \['counts'\]"):
        setup_anndata(kang_small, layer="spliced")


def test_requested_genes_absent(kang_small):
    with pytest.raises(KeyError, match="NOTAGENE"):
        setup_anndata(kang_small, genes=["CD3D", "NOTAGENE"])


def _tiny(x, **obs):
    a = ad.AnnData(X=x, obs=pd.DataFrame(obs or None, index=[f"c{i}" for i in range(x.shape[0])]))
    a.var_names = [f"g{i}" for i in range(x.shape[1])]
    return a


def test_nan_and_inf_are_refused(tmp_path):
    x = np.ones((5, 4), np.float32)
    x[2, 1] = np.nan
    a = _tiny(x)
    path = tmp_path / "nan.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match=r"X of '.*nan.h5ad' holds 1 NaN or infinite"):
        setup_anndata(str(path))
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        setup_anndata(_tiny(sp.csr_matrix(x)))


def test_negative_values_presented_as_counts():
    x = np.abs(np.random.default_rng(0).poisson(2, (6, 5))).astype(np.float32)
    x[0, 0] = -1
    with pytest.raises(ValueError, match="presented as counts but holds negative values"):
        setup_anndata(_tiny(x), input_kind="counts")
    with pytest.raises(ValueError, match="looks scaled"):
        setup_anndata(_tiny(x))


def test_scaled_data_points_to_raw():
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    with pytest.raises(ValueError, match="use_raw=True"):
        setup_anndata(pbmc)
    data = setup_anndata(pbmc, use_raw=True, n_top_genes=None, condition_keys=["bulk_labels"])
    assert data.spec.n_genes == pbmc.raw.n_vars and data.spec.input_kind == "log1p"


def test_empty_anndata():
    with pytest.raises(ValueError, match=r"is empty \(0 cells"):
        setup_anndata(_tiny(np.zeros((0, 3), np.float32)))


def test_unknown_covariate_value_in_new_data(kang_small):
    data = setup_anndata(kang_small, n_top_genes=30, condition_keys=["condition"])
    other = kang_small[:10].copy()
    other.obs["condition"] = "heat-shock"
    with pytest.raises(ValueError, match=r"obs\['condition'\] has values the model does not know: \['heat-shock'\]"):
        transform_like(data.spec, other)


def test_new_data_missing_model_genes(kang_small):
    data = setup_anndata(kang_small, n_top_genes=30)
    other = kang_small[:, [g for g in kang_small.var_names if g != data.spec.gene_names[0]]].copy()
    with pytest.raises(KeyError, match=data.spec.gene_names[0]):
        transform_like(data.spec, other)
