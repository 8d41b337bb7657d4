import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scidiff.data import (DataSpec, detect_input, log_normalize, read_h5ad, setup_anndata, setup_streaming,
                          transform_like)


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
    real = kang[:50, data.spec.gene_names].X.toarray()
    np.testing.assert_allclose(other.log_expression(), real, atol=1e-5)
    # the zeros come back exact, none below zero (a file scidiff writes them into reads back as log1p)
    np.testing.assert_array_equal(other.log_expression() == 0, real == 0)
    assert torch.equal(other.covariates["cell_type"],
                       torch.tensor([data.spec.categorical["cell_type"].index(c) for c in kang.obs.cell_type[:50]]))


def test_counts_for_a_model_trained_on_log1p_values_take_their_scale(kang_small):
    """A model set up on log1p values normalised to 1,000 per cell, given the same cells' counts:
    they are normalised to that scale (warned), not to 10,000, so the model sees its own values;
    a model set up on counts normalises new counts as it did, without a word."""
    import warnings

    counts = kang_small.layers["counts"]
    per_cell = np.asarray(counts.sum(1)).ravel()
    log1p = np.log1p(np.asarray(counts.multiply(1e3 / per_cell[:, None]).todense(), np.float32))
    cells = ad.AnnData(X=log1p, obs=kang_small.obs[["cell_type"]].copy(), layers={"counts": counts.copy()})
    cells.var_names = kang_small.var_names
    spec = setup_anndata(cells, n_top_genes=100).spec
    want = cells[:, spec.gene_names].X
    with pytest.warns(UserWarning, match=r"normalised to 1,000 per cell, not 10,000: the model was trained on "
                                         r"log1p values of that scale"):
        got = transform_like(spec, cells, layer="counts").log_expression()
    np.testing.assert_allclose(got, want, atol=1e-4)
    spec = setup_anndata(cells, layer="counts", n_top_genes=100).spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform_like(spec, cells, layer="counts")


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


@pytest.mark.parametrize("setup", [setup_anndata, setup_streaming])
def test_one_name_given_as_a_string_is_that_name_not_its_characters(tmp_path, setup):
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (40, 12)).astype(np.float32)),
                   obs=pd.DataFrame({"cell_type": pd.Categorical(["B", "T"] * 20),
                                     "drug": pd.Categorical(["ctl", "ctl", "x", "y"] * 10)},
                                    index=[f"c{i}" for i in range(40)]))
    a.var_names = [f"g{i}" for i in range(12)]
    path = str(tmp_path / "tiny.h5ad")
    a.write_h5ad(path)
    given = setup(path, n_top_genes=10, genes="g3", condition_keys="cell_type")
    assert list(given.spec.gene_names) == ["g3"] and given.spec.categorical == {"cell_type": ["B", "T"]}
    screen = setup(path, n_top_genes=10, condition_keys="drug", perturbation_keys="drug", control_labels="ctl")
    listed = setup(path, n_top_genes=10, condition_keys=["drug"], perturbation_keys=["drug"], control_labels=["ctl"])
    assert screen.spec.to_dict() == listed.spec.to_dict()
    assert list(screen.spec.perturbation_keys) == ["drug"] and list(screen.spec.control_labels) == ["ctl"]


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


# -- damaged matrices, value classes, genes and controls -------------------------------------------

def test_broken_csr_of_a_python_anndata_is_named_before_scipy_touches_it():
    x = sp.csr_matrix(np.arange(1, 21, dtype=np.float32).reshape(5, 4))
    a = _tiny(x)
    a.X.indices[a.X.indptr[3] + 1] = 99  # cell c3
    with pytest.raises(ValueError, match=r"^the AnnData: X/indices of cell 'c3' \(row 3\) holds column 99, "
                                         r"outside \[0, 4\)$"):
        setup_anndata(a, n_top_genes=None)
    b = _tiny(x.copy())
    b.X.indptr[2] = b.X.indptr[3] + 1  # cell c2 ends before it starts
    with pytest.raises(ValueError, match=r"X/indptr is not monotone: cell 'c2' \(row 2\) ends at"):
        setup_anndata(b, n_top_genes=None)


def test_broken_csc_is_named_by_gene_and_a_sound_csc_is_read():
    x = np.arange(1, 21, dtype=np.float32).reshape(5, 4)
    good = setup_anndata(_tiny(sp.csc_matrix(x)), n_top_genes=None, scaling="none")
    np.testing.assert_allclose(good.log_expression(), setup_anndata(_tiny(x), n_top_genes=None,
                                                                    scaling="none").log_expression(), rtol=1e-6)
    a = _tiny(sp.csc_matrix(x))
    a.X.indices[a.X.indptr[1]] = 50  # gene g1
    with pytest.raises(ValueError, match=r"X/indices of gene 'g1' \(column 1\) holds row 50, outside \[0, 5\)"):
        setup_anndata(a, n_top_genes=None)


def test_every_sparse_matrix_of_a_file_is_checked_on_read(kang_small, tmp_path):
    import h5py

    a = kang_small[:40, :30].copy()
    a.raw = a.copy()
    row = next(i for i in range(7, 40) if a.layers["counts"][i].nnz and a.X[i].nnz)
    for key in ("layers/counts", "raw/X"):
        path = tmp_path / f"{key.replace('/', '_')}.h5ad"
        a.write_h5ad(path)
        with h5py.File(path, "r+") as f:
            f[f"{key}/indices"][f[f"{key}/indptr"][row]] = 12345
        with pytest.raises(ValueError, match=rf"{path.name}': {key}/indices of cell '{a.obs_names[row]}' "
                                             rf"\(row {row}\) holds column 12345, outside \[0, 30\)"):
            read_h5ad(path)


def test_all_zero_matrix_is_refused_but_zero_cells_and_genes_are_fine(kang_small):
    zero = kang_small[:, :200].copy()
    zero.X = sp.csr_matrix(zero.shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"X of the AnnData is all zeros: every cell has zero counts "
                                         r"\(300 cells x 200 genes\)"):
        setup_anndata(zero, n_top_genes=50)
    with pytest.raises(ValueError, match="every cell has zero counts"):
        detect_input(np.zeros((3, 4), np.float32), "X", "log1p")
    some = kang_small[:, :200].copy()
    x = some.layers["counts"].tolil()
    x[:20] = 0  # empty cells
    x[:, :30] = 0  # genes never detected
    some.layers["counts"] = x.tocsr()
    data = setup_anndata(some, layer="counts", n_top_genes=100, scaling="none")
    assert data.spec.n_genes == 100 and len(data) == 300
    assert not set(data.spec.gene_names) & set(some.var_names[:30])  # undetected genes rank last
    np.testing.assert_array_equal(data.log_expression()[:20], 0)


def _shared(name: str) -> str:
    """A file of ../shared/data (the test skips without it). Not imported from conftest: under
    tests/hostile another module of that name replaces it during a whole-suite run."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", name)
    if not os.path.exists(path):
        pytest.skip(f"needs the shared real data file {path}")
    return path


def _tpm(adata):
    counts = sp.csr_matrix(adata.layers["counts"], dtype=np.float64)
    return sp.csr_matrix(sp.diags(1e6 / np.asarray(counts.sum(1)).ravel()) @ counts / 3.7, dtype=np.float32)


def test_tpm_like_values_are_refused_unless_insisted(kang_small):
    tpm = kang_small.copy()
    tpm.X = _tpm(tpm)
    top = float(tpm.X.max())
    with pytest.raises(ValueError, match=rf"holds neither counts nor log1p-normalised values: max {top:.6g} with "
                                         r"100.0% of the nonzero values non-integer.*--layer.*--use-raw.*"
                                         r"data: \{input: log1p\}.*input_kind='log1p'"):
        setup_anndata(tpm, n_top_genes=50)
    insisted = setup_anndata(tpm, n_top_genes=50, input_kind="log1p")
    assert insisted.spec.input_kind == "log1p" and insisted.spec.n_genes == 50
    assert setup_anndata(tpm, layer="counts", n_top_genes=50).spec.input_kind == "counts"
    near = kang_small.copy()
    near.X = near.layers["counts"].copy()
    near.X.data = near.X.data + np.float32(1e-4)  # counts with rounding noise
    with pytest.raises(ValueError, match=r"within 1e-3 of integers: if they are counts, round them"):
        detect_input(near.X, "X")


@pytest.mark.parametrize("name,kwargs,expected", [
    ("kang_ifnb_pbmc.h5ad", {}, "log1p"),
    ("kang_ifnb_pbmc.h5ad", {"layer": "counts"}, "counts"),
    ("pbmc68k_reduced.h5ad", {}, "scaled"),
    ("pbmc68k_reduced.h5ad", {"use_raw": True}, "log1p"),
    ("pbmc10k_protein_200cells.h5ad", {}, "counts"),
    ("papalexi21_thp1_sceptre_lowmoi.h5ad", {}, "counts"),
    ("zhao21_glioblastoma_panobinostat_lemur.h5ad", {"layer": "counts"}, "counts"),
    ("zhao21_glioblastoma_panobinostat_lemur.h5ad", {"layer": "logcounts"}, "log1p"),
    ("klein15_mesc_lif_timecourse_tmscc.h5ad", {}, "counts"),
    ("10x_v3_filtered_feature_bc_matrix.h5", {}, "counts"),
])
def test_real_files_are_classified_from_their_values(name, kwargs, expected):
    from scidiff.data.preprocess import expression_matrix

    adata = read_h5ad(_shared(name))
    matrix, _, key = expression_matrix(adata, kwargs.get("layer"), kwargs.get("use_raw", False))
    if expected == "scaled":
        with pytest.raises(ValueError, match=r"negative values.*--use-raw"):
            detect_input(matrix, key)
    else:
        assert detect_input(matrix, key) == expected


def test_exactly_n_top_genes_despite_ties(kang_small):
    import scanpy as sc

    from scidiff.data.preprocess import select_genes

    logged, _ = log_normalize(kang_small.layers["counts"], 1e4)
    ref = ad.AnnData(X=logged.copy())
    sc.pp.highly_variable_genes(ref, n_top_genes=500, flavor="seurat")
    assert ref.var["highly_variable"].sum() == 502  # scanpy keeps the genes tied with the 500th
    chosen = select_genes(logged, kang_small.var_names, n_top_genes=500)
    assert len(chosen) == 500 and set(chosen) <= set(kang_small.var_names[ref.var["highly_variable"].to_numpy()])
    assert chosen == [g for g in kang_small.var_names if g in set(chosen)]  # file order
    assert setup_anndata(kang_small, layer="counts", n_top_genes=500).spec.n_genes == 500


def test_duplicate_gene_names_are_refused(kang_small):
    dup = kang_small[:, :50].copy()
    names = list(dup.var_names)
    names[3] = names[2]
    dup.var_names = names
    with pytest.raises(ValueError, match=rf"X of the AnnData has 1 duplicated gene name\(s\): '{names[2]}' "
                                         r"\(columns \[2, 3\]\).*adata.var_names_make_unique\(\)"):
        setup_anndata(dup, n_top_genes=None)


def test_10x_h5_is_read_and_duplicated_symbols_made_unique(tmp_path, capsys):
    import shutil

    import h5py

    path = tmp_path / "dup_10x.h5"
    shutil.copy(_shared("10x_v3_filtered_feature_bc_matrix.h5"), path)
    with h5py.File(path, "r+") as f:
        names = f["matrix/features/name"]
        names[3] = names[2]
    adata = read_h5ad(path)
    assert adata.shape == (1107, 507) and adata.var_names.is_unique
    assert adata.var_names[3] == adata.var_names[2] + "-1"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 duplicated gene symbol(s)" in err[0] and "var_names_make_unique()" in err[0]
    assert setup_anndata(adata, n_top_genes=100).spec.input_kind == "counts"


def test_a_perturbation_needs_its_control_cells(kang_small):
    with pytest.raises(ValueError, match=r"no cell of obs\['condition'\] in the AnnData carries a control label "
                                         r"\['ctl'\].*'stimulated' \(\d+ cells\), 'control' \(\d+ cells\).*"
                                         r"\('control' reads as a control label: --control-labels control\)"):
        setup_anndata(kang_small, n_top_genes=20, perturbation_keys=["condition"], control_labels=["ctl"])
    screen = kang_small.copy()  # a CRISPR screen's guides that target nothing, by default labels: named, not taken
    screen.obs["condition"] = screen.obs["condition"].astype(str).replace({"control": "Non-Targeting"})
    with pytest.raises(ValueError, match=r"'Non-Targeting' reads as a control label: --control-labels Non-Targeting"):
        setup_anndata(screen, n_top_genes=20, perturbation_keys=["condition"])
    screen.obs["condition"] = screen.obs["condition"].replace({"Non-Targeting": "KO1"})
    with pytest.raises(ValueError, match=r"Pass the label of the unperturbed cells$"):
        setup_anndata(screen, n_top_genes=20, perturbation_keys=["condition"])
    with pytest.warns(UserWarning, match=r"control label\(s\) \['ctl'\] of obs\['condition'\].*match no cell"):
        data = setup_anndata(kang_small, n_top_genes=20, perturbation_keys=["condition"],
                             control_labels=["control", "ctl"])
    assert data.spec.categorical["condition"] == ["stimulated"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default labels ('control', 'ctrl') do not warn
        setup_anndata(kang_small, n_top_genes=20, perturbation_keys=["condition"])


# -- atomic writes -----------------------------------------------------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_writes_clean_up_after_dead_writers_and_use_the_normal_mode(tmp_path):
    import os
    import re

    from scidiff.data.h5ad_writer import H5adWriter
    from scidiff.data.io import atomic_path

    target = tmp_path / "out.txt"
    dead = tmp_path / f".tmp-{_dead_pid()}-0a1b2c3d.out.txt"
    alive = tmp_path / f".tmp-{os.getppid()}-0a1b2c3d.out.txt"  # the process that started pytest
    other = tmp_path / f".tmp-{_dead_pid()}-0a1b2c3d.other.txt"  # another target's
    for p in (dead, alive, other):
        p.write_text("partial")
    seen = []
    atomic_path(target, lambda tmp: (seen.append(os.path.basename(tmp)), open(tmp, "w").write("done")))
    assert re.fullmatch(rf"\.tmp-{os.getpid()}-[0-9a-f]+\.out\.txt", seen[0])
    assert target.read_text() == "done" and not dead.exists() and alive.exists() and other.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        atomic_path(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("fail")))
    assert target.read_text() == "done"
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, alive.name, other.name])

    stale = tmp_path / f".tmp-{_dead_pid()}-deadbeef.w.h5ad"
    stale.write_bytes(b"partial")
    with H5adWriter(tmp_path / "w.h5ad", ["a", "b"]) as writer:
        writer.append(np.ones((2, 2), np.float32))
        assert not stale.exists()
        assert any(re.fullmatch(rf"\.tmp-{os.getpid()}-[0-9a-f]+\.w\.h5ad", n) for n in os.listdir(tmp_path))
    assert os.stat(tmp_path / "w.h5ad").st_mode & 0o777 == 0o666 & ~umask
    assert read_h5ad(tmp_path / "w.h5ad").shape == (2, 2)


# -- damaged HDF5 metadata: refused before libhdf5 hangs or crashes on it ------------------------

def test_a_string_reference_that_points_nowhere_is_refused(kang_small, tmp_path):
    import h5py

    path = tmp_path / "ref.h5ad"
    kang_small[:20, :10].copy().write_h5ad(path)
    with h5py.File(path, "r") as f:
        index = f["var"][f["var"].attrs["_index"]]
        name, at = index.name.lstrip("/"), index.id.get_offset() + 16 * 4  # the reference of gene 4
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write((2**32 - 5).to_bytes(4, "little") + (12345).to_bytes(8, "little"))  # 4 GiB, no heap there
    with pytest.raises(ValueError, match=rf"ref.h5ad' is damaged: {name} element 4 points at byte 12345, "
                                         r"where no global heap is"):
        read_h5ad(path)


@pytest.mark.parametrize("child,message", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"libhdf5 crashed \(SIGSEGV\) reading its metadata"),
    ("import time; time.sleep(30)", r"did not finish within 1 s \(libhdf5 loops forever on some damaged files\)"),
    ("raise SystemExit(4)", r"asked for more than 2 GiB of memory"),
])
def test_a_crash_hang_or_runaway_allocation_of_the_probe_is_a_clean_error(child, message, kang_small, tmp_path,
                                                                          monkeypatch):
    import sys

    from scidiff.data import hdf5_guard

    path = tmp_path / "probed.h5ad"
    kang_small[:5, :5].copy().write_h5ad(path)
    monkeypatch.setattr(hdf5_guard, "_probe_command", lambda p: [sys.executable, "-c", child])
    monkeypatch.setattr(hdf5_guard, "PROBE_TIMEOUT_S", 1.0)
    with pytest.raises(ValueError, match=rf"probed.h5ad' is damaged: .*{message}"):
        read_h5ad(path)
    monkeypatch.undo()
    assert read_h5ad(path).shape == (5, 5)  # the real probe passes the file


def test_a_condition_that_teaches_little_is_warned_about(kang_small):
    import warnings

    cells = kang_small.copy()
    cells.obs["batch"] = "b1"
    with pytest.warns(UserWarning, match=r"obs\['batch'\] of the AnnData has one value \('b1'\) for every cell"):
        setup_anndata(cells, n_top_genes=20, condition_keys=["batch"])
    labels = cells.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:3], labels[3] = "Rare", "Rarer"
    cells.obs["cell_type"] = labels
    with pytest.warns(UserWarning, match=r"2 value\(s\) with fewer than 10 cells \('Rarer' \(1 cell\), "
                                         r"'Rare' \(3 cells\)\)"):
        setup_anndata(cells, n_top_genes=20, condition_keys=["cell_type"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Kang's 300 cells: every type has 14 or more
        setup_anndata(kang_small, n_top_genes=20, condition_keys=["cell_type", "condition"])


@pytest.mark.parametrize("streamed", [False, True])
def test_empty_cells_and_unfiltered_matrices_are_warned_about(kang_small, tmp_path, streamed):
    import warnings

    def set_up(cells):
        if not streamed:
            return setup_anndata(cells, n_top_genes=20, layer="counts")
        path = tmp_path / "cells.h5ad"
        cells.write_h5ad(path)
        return setup_streaming(str(path), n_top_genes=20, layer="counts", batch_size=32)

    cells = kang_small.copy()
    counts = cells.layers["counts"].tolil()
    counts[[4, 9]] = 0  # two cells without a count
    cells.layers["counts"] = counts.tocsr()
    first = "'row 4'" if streamed else repr(str(cells.obs_names[4]))
    with pytest.warns(UserWarning, match=r"counts\W* of .*: 2 of 300 cells have no detected gene "
                                         rf"\(e.g. \[{re.escape(first)}, .*min_genes=1"):
        set_up(cells)
    rng = np.random.default_rng(0)  # an unfiltered droplet matrix: 300 cells beside 900 barcodes of 1-3 counts
    droplets = sp.random(900, cells.n_vars, density=2 / cells.n_vars, format="csr", random_state=rng,
                         data_rvs=lambda k: rng.integers(1, 3, k))
    barcodes = ad.AnnData(droplets.astype(np.float32), layers={"counts": droplets.astype(np.float32)},
                          obs=pd.DataFrame(index=[f"droplet{i}" for i in range(900)]), var=cells.var[[]])
    raw = ad.concat([kang_small[:, :], barcodes], join="inner")
    with pytest.warns(UserWarning, match=r"the median cell has [0-9] detected genes .*unfiltered droplet matrix"):
        set_up(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # filtered cells: no warning
        set_up(kang_small)


def test_an_unknown_label_names_the_closest_known_ones_and_a_long_vocabulary_is_cut():
    spec = DataSpec(gene_names=["g0"], categorical={"stim": ["False", "True"],
                                                    "guide": [f"GENE{i}" for i in range(100)]})
    with pytest.raises(ValueError, match=r"unknown value 'true' for condition 'stim'; did you mean 'True'\? "
                                         r"known values: \['False', 'True'\]$"):
        spec.encode_label("stim", "true")
    with pytest.raises(ValueError, match=r"did you mean 'GENE12' or 'GENE2' or 'GENE1'\? known values: "
                                         r"\['GENE0', .*'GENE39'\]\.\.\. \(100 in all\)$"):
        spec.encode_label("guide", "GENE12x")
    with pytest.raises(ValueError, match=r"unknown value 'Neuron' for condition 'stim'; known values: \["):
        spec.encode_label("stim", "Neuron")  # nothing close: no guess
