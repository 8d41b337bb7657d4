"""Streaming from .h5ad on disk: every layout against the in-memory AnnData path, both backends
(the C++ extension and h5py + numpy), the epoch/shard plan, setup from streamed moments, the
chunked writer, hostile files and a byte-flip fuzz test."""
import os
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scidiff.data import setup_anndata
from scidiff.data.block_order import BlockOrder, as_runs, runs_to_ids
from scidiff.data.h5ad_layout import open_matrix
from scidiff.data.h5ad_writer import H5adWriter
from scidiff.data.moments import GeneMoments
from scidiff.data.stream_setup import setup_streaming, stream_like
from scidiff.data.streaming import MatrixReader, Transform, extension_available

BACKENDS = ["native", "python"] if extension_available() else ["python"]
N_CELLS, N_GENES = 203, 120
GENES = [f"gene{i}" for i in range(N_GENES)]


def make_adata(seed: int = 0) -> ad.AnnData:
    """Counts with gene-dependent rates, a few empty cells (first, middle, last), covariates, a
    counts layer stored as int64, a log-normalised layer and a raw with extra genes."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.6, 1.5, N_GENES)
    dense = rng.poisson(rate[None, :] * rng.uniform(0.3, 2.0, (N_CELLS, 1))) * (rng.random((N_CELLS, N_GENES)) < 0.35)
    dense[[0, 77, N_CELLS - 1]] = 0
    x = sp.csr_matrix(dense.astype(np.float32))
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], N_CELLS)),
                        "dose": rng.choice([0.0, 0.5, 2.0], N_CELLS)}, index=[f"c{i}" for i in range(N_CELLS)])
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=GENES))
    a.layers["counts"] = sp.csr_matrix(dense.astype(np.int64))
    totals = np.maximum(dense.sum(1, keepdims=True), 1)
    a.layers["lognorm"] = sp.csr_matrix(np.log1p(dense / totals * 1e4).astype(np.float32))
    extra = rng.poisson(1.0, (N_CELLS, 9)) * (rng.random((N_CELLS, 9)) < 0.5)
    a.raw = ad.AnnData(X=sp.csr_matrix(np.hstack([dense, extra]).astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=GENES + [f"extra{i}" for i in range(9)]))
    return a


def rewrite_csr(path, key="X", *, data_dtype=None, index_dtype=None, indptr_dtype=None, **storage):
    """Store the CSR arrays at ``key`` again with other dtypes / storage (h5py keywords)."""
    with h5py.File(path, "r+") as f:
        g = f[key]
        for name, dtype in (("data", data_dtype), ("indices", index_dtype), ("indptr", indptr_dtype)):
            arr = g[name][...]
            del g[name]
            g.create_dataset(name, data=arr.astype(dtype or arr.dtype), **storage)


def write_dense(path, matrix, **storage):
    with h5py.File(path, "r+") as f:
        del f["X"]
        ds = f.create_dataset("X", data=matrix, **storage)
        ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"


LAYOUTS = {
    "anndata": lambda a, p: a.write_h5ad(p),  # chunked, uncompressed, int32 indptr/indices
    "gzip": lambda a, p: a.write_h5ad(p, compression="gzip"),
    "contiguous-int64": lambda a, p: (a.write_h5ad(p), rewrite_csr(p, index_dtype=np.int64, indptr_dtype=np.int64)),
    "small-chunks-shuffle-gzip-float64-uint16": lambda a, p: (
        a.write_h5ad(p), rewrite_csr(p, data_dtype=np.float64, index_dtype=np.uint16, chunks=(97,), maxshape=(None,),
                                     compression="gzip", shuffle=True)),
    "lzf-via-h5py": lambda a, p: (a.write_h5ad(p), rewrite_csr(p, chunks=(64,), compression="lzf")),
    "dense": lambda a, p: (a.write_h5ad(p), write_dense(p, a.X.toarray())),
    "dense-2d-chunks-gzip": lambda a, p: (a.write_h5ad(p), write_dense(p, a.X.toarray(), chunks=(16, 7),
                                                                       compression="gzip", shuffle=True)),
    "dense-int32-chunked": lambda a, p: (a.write_h5ad(p), write_dense(p, a.X.toarray().astype(np.int32),
                                                                      chunks=(50, N_GENES))),
    # half precision, as some tools store it: widened to float32 before the compiled densify
    "dense-float16": lambda a, p: (a.write_h5ad(p), write_dense(p, a.X.toarray().astype(np.float16))),
    "csr-float16": lambda a, p: (a.write_h5ad(p), rewrite_csr(p, data_dtype=np.float16)),
}
SOURCES = [("anndata", {}), ("anndata", {"layer": "counts"}), ("anndata", {"use_raw": True}),
           ("anndata", {"layer": "lognorm"})] + [(name, {}) for name in LAYOUTS if name != "anndata"]


@pytest.fixture(scope="module")
def adata():
    return make_adata()


@pytest.fixture(scope="module")
def files(tmp_path_factory, adata):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, write in LAYOUTS.items():
        out[name] = str(root / f"{name}.h5ad")
        write(adata, out[name])
    return out


def reference(adata, source):
    if source.get("use_raw"):
        return sp.csr_matrix(adata.raw.X)
    return sp.csr_matrix(adata.layers[source["layer"]] if source.get("layer") else adata.X)


RUN_PATTERNS = [[[0, N_CELLS]], [[0, 1], [5, 9], [76, 80], [N_CELLS - 3, N_CELLS]], [[100, 100], [150, 190]]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,source", SOURCES)
def test_rows_come_off_disk_bit_identical(files, adata, layout, source, backend):
    reader = MatrixReader(files[layout], backend=backend, **source)
    ref = reference(adata, source)
    for runs in RUN_PATTERNS:
        got = reader.read_matrix(runs)
        want = ref[runs_to_ids(np.array(runs))]
        if sp.issparse(got):
            assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
            assert np.array_equal(got.data, want.data.astype(got.dtype))
        else:
            assert np.array_equal(got, want.toarray().astype(got.dtype))
    if layout == "lzf-via-h5py":
        assert not reader.layout.arrays["data"].direct and "lzf" in reader.layout.arrays["data"].reason


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,source", SOURCES)
def test_batches_equal_the_in_memory_path(files, adata, layout, source, backend):
    genes = [GENES[i] for i in (5, 0, 119, 33, 60, 61, 2)] + (["extra3"] if source.get("use_raw") else [])
    mem = setup_anndata(adata, genes=genes, condition_keys=["cell_type"], continuous_keys=["dose"],
                        scaling="gene", **source)
    cells = stream_like(mem.spec, files[layout], backend=backend, **source)
    loader = cells.loader(batch_size=16, shuffle=False, prefetch=3)
    batches = list(loader)  # kept alive together: reused buffers must never overwrite a live batch
    assert len(batches) == len(loader) == -(-N_CELLS // 16) and batches[-1]["x"].shape == (N_CELLS % 16, len(genes))
    assert set(batches[0]) == {"x", "cell_type", "dose"}
    x = torch.cat([b["x"] for b in batches])
    if backend == "python":  # the same numpy operations as setup_anndata: bit for bit
        assert torch.equal(x, mem.x)
    else:  # log1p in C (glibc) and in numpy differ in the last bit
        torch.testing.assert_close(x, mem.x, rtol=1e-5, atol=1e-5)
    for key in ("cell_type", "dose"):
        got = torch.cat([b[key] for b in batches])
        assert got.dtype == mem.covariates[key].dtype and torch.equal(got, mem.covariates[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_epochs_visit_every_cell_once_and_match_memory(files, adata, backend):
    mem = setup_anndata(adata, genes=GENES[:40], condition_keys=["cell_type"])
    cells = stream_like(mem.spec, files["gzip"], backend=backend)
    loader = cells.loader(batch_size=24, shuffle=True, seed=7, block_size=8, fetch_batches=3, return_index=True)
    epochs = []
    for _ in range(2):
        seen = []
        for b in loader:
            idx = b["cell_index"]
            torch.testing.assert_close(b["x"], mem.x[idx], rtol=1e-5, atol=1e-5)
            assert torch.equal(b["cell_type"], mem.covariates["cell_type"][idx])
            seen.append(idx)
        seen = torch.cat(seen)
        assert sorted(seen.tolist()) == list(range(N_CELLS))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])
    again = cells.loader(batch_size=24, shuffle=True, seed=7, block_size=8, fetch_batches=3, return_index=True,
                         prefetch=0)
    assert torch.equal(torch.cat([b["cell_index"] for b in again]), epochs[0])
    # cells of a batch come from several blocks (shuffled in memory), not one contiguous run
    first = next(iter(cells.loader(batch_size=24, seed=7, block_size=8, fetch_batches=3, return_index=True)))
    assert len(as_runs(np.sort(first["cell_index"].numpy()))) > 1


@pytest.mark.parametrize("n,world,batch,block,drop_last", [(203, 1, 16, 8, False), (203, 3, 16, 8, False),
                                                          (203, 4, 10, 7, True), (5, 8, 2, 3, False),
                                                          (1000, 2, 64, 64, False)])
def test_shards_are_disjoint_and_cover(n, world, batch, block, drop_last):
    runs = as_runs(np.r_[0:n // 2, n // 2 + 10:n + 10])  # a subset with a gap
    all_ids = runs_to_ids(runs)
    per_rank = []
    for rank in range(world):
        order = BlockOrder(runs, batch_size=batch, block_size=block, fetch_batches=3, seed=1, rank=rank,
                           world_size=world, drop_last=drop_last)
        ids, n_batches = [], 0
        for g in order.groups(epoch=4):
            gid = g.cell_ids
            assert (np.diff(g.runs[:, 0]) > 0).all()  # read in file order
            for rows in g.batches:
                assert len(rows) == batch or not drop_last
                ids.append(gid[rows])
                n_batches += 1
        assert n_batches == len(order)
        per_rank.append(np.concatenate(ids) if ids else np.zeros(0, np.int64))
    flat = np.concatenate(per_rank)
    assert len(np.unique(flat)) == len(flat)  # disjoint (and no cell twice within a rank)
    if not drop_last:
        assert np.array_equal(np.sort(flat), all_ids)  # covering
    sizes = [len(p) for p in per_rank]
    assert max(sizes) - min(sizes) <= (batch if drop_last else 1)


def test_split_keeps_whole_blocks_and_partitions(files, adata):
    mem = setup_anndata(adata, genes=GENES[:10])
    cells = stream_like(mem.spec, files["anndata"], block_size=16)
    train, val = cells.split(0.25, seed=3)
    ids = np.concatenate([train.cell_ids(), val.cell_ids()])
    assert np.array_equal(np.sort(ids), np.arange(N_CELLS)) and 0 < len(val) < N_CELLS
    assert all((r[0] % 16 == 0) for r in val.runs)
    got = torch.cat([b["x"] for b in val.loader(batch_size=32, shuffle=False)])
    torch.testing.assert_close(got, mem.x[val.cell_ids()], rtol=1e-5, atol=1e-5)


def test_gene_moments_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1000, 12)) * rng.uniform(0.1, 3, 12) + 50).astype(np.float32)
    m = GeneMoments(12)
    for a, b in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        m.update(x[a:b])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var, x64.var(0), rtol=1e-9)
    np.testing.assert_allclose(m.cov, np.cov(x64, rowvar=False, bias=True), rtol=1e-4, atol=1e-6)


def test_label_counts_of_perturbations_alike_streamed_and_in_memory(tmp_path, adata):
    """Training cells per condition (the prior of design's condition selection): combinations by
    their label, 'ctrl' counted as control, whether the covariates were streamed or not."""
    a = adata.copy()
    a.obs["drug"] = np.resize(["ctrl", "A", "B", "A+B", "control", "B+A"], a.n_obs)
    path = tmp_path / "drugs.h5ad"
    a.write_h5ad(path)
    kw = dict(n_top_genes=None, genes=GENES[:5], condition_keys=["cell_type"], perturbation_keys=["drug"])
    mem = setup_anndata(a, **kw).spec.label_counts
    st = setup_streaming(str(path), **kw).spec.label_counts
    n = a.obs["drug"].value_counts()
    assert mem == st
    assert mem["drug"] == {"control": n["ctrl"] + n["control"], "A": n["A"], "B": n["B"], "A+B": n["A+B"] + n["B+A"]}


@pytest.mark.parametrize("scaling,target_sum", [("global", 1e4), ("gene", None), ("none", 1e4)])
def test_setup_streaming_matches_setup_anndata(files, adata, scaling, target_sum):
    kw = dict(n_top_genes=30, condition_keys=["cell_type"], continuous_keys=["dose"], scaling=scaling,
              target_sum=target_sum)
    mem = setup_anndata(adata, **kw)
    st = setup_streaming(files["gzip"], hvg_cells=10**9, **kw)
    assert st.spec.gene_names == mem.spec.gene_names and st.spec.input_kind == mem.spec.input_kind == "counts"
    assert st.spec.target_sum == pytest.approx(mem.spec.target_sum)
    assert st.spec.categorical == mem.spec.categorical and st.spec.continuous == mem.spec.continuous
    assert st.spec.label_counts == mem.spec.label_counts == {"cell_type": adata.obs["cell_type"].value_counts().to_dict()}
    np.testing.assert_allclose(st.spec.gene_offset, mem.spec.gene_offset, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.spec.gene_scale, mem.spec.gene_scale, rtol=1e-5)
    assert st.spec.log_total == pytest.approx(mem.spec.log_total, rel=1e-5)
    x = mem.x.double().numpy()
    np.testing.assert_allclose(st.moments["mean"], x.mean(0), atol=1e-5)
    np.testing.assert_allclose(st.moments["cov"], np.cov(x, rowvar=False, bias=True), rtol=1e-4, atol=1e-5)
    # a subsample chooses genes without reading every cell, and never more than asked
    sub = setup_streaming(files["anndata"], n_top_genes=30, hvg_cells=64, block_size=16, covariance=False)
    assert len(sub.spec.gene_names) == 30 and sub.moments["cov"] is None


def test_fit_latent_from_moments_equals_fit_latent(adata):
    from scidiff.models import ScIDiffModel

    data = setup_anndata(adata, n_top_genes=40)
    ref = ScIDiffModel.from_data(data, latent_dim=6, hidden_dim=16, num_layers=1)
    x = data.x.double().numpy()
    m = GeneMoments(40)
    m.update(data.x.numpy())
    got = ScIDiffModel(gene_dim=40, data_spec=data.spec, latent_dim=6, hidden_dim=16, num_layers=1)
    got.fit_latent_from_moments(m.mean, m.cov, m.n)
    sign = torch.sign((ref.latent_basis * got.latent_basis).sum(1, keepdim=True))
    torch.testing.assert_close(got.latent_basis * sign, ref.latent_basis, rtol=0, atol=2e-4)
    torch.testing.assert_close(got.latent_mean, ref.latent_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.latent_scale, ref.latent_scale, rtol=1e-4, atol=0)
    np.testing.assert_allclose(m.mean, x.mean(0), atol=1e-6)


def test_loader_drives_the_trainer(files, adata, tmp_path):
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    cells = setup_streaming(files["anndata"], n_top_genes=20, condition_keys=["cell_type"], hvg_cells=10**9)
    model = ScIDiffModel(gene_dim=20, data_spec=cells.spec, latent_dim=4, hidden_dim=16, num_layers=1,
                         num_timesteps=50)
    model.fit_latent_from_moments(cells.moments["mean"], cells.moments["cov"], cells.moments["n"])
    train, val = cells.split(0.2)
    trainer = ScIDiffTrainer(model, train.loader(32), val.loader(32, shuffle=False), device="cpu",
                             warmup_steps=2, progress=False)
    history = trainer.train(2)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)


def test_cli_train_streaming_and_chunked_sample(files, tmp_path):
    from scidiff.cli import main

    config = tmp_path / "small.yaml"
    config.write_text("model: {gene_dim: 25, hidden_dim: 16, num_layers: 1, num_timesteps: 50, latent_dim: 5}\n"
                      "training: {batch_size: 32, num_epochs: 2, warmup_steps: 2, checkpoint_every: 1}\n")
    run = tmp_path / "run"
    assert main(["train", "--data", files["gzip"], "--streaming", "--condition-keys", "cell_type",
                 "--config", str(config), "--out", str(run)]) == 0
    assert {"model.pt", "config.yaml", "history.csv"} <= set(os.listdir(run))
    out = tmp_path / "gen.h5ad"
    assert main(["sample", "--model", str(run), "-n", "7", "--condition", "cell_type=B", "--condition", "cell_type=NK",
                 "--steps", "2", "--out", str(out)]) == 0
    g = ad.read_h5ad(out)
    assert g.shape == (14, 25) and list(g.obs["cell_type"]) == ["B"] * 7 + ["NK"] * 7
    assert list(g.obs_names[:2]) == ["generated_0-0", "generated_1-0"] and "scidiff" in g.uns


def test_a_streamed_model_measures_its_cells_like_an_in_memory_one(files, adata):
    """The streamed set-up fits the detection model (so sampling returns measured cells by
    default); on all of the file's cells it equals the in-memory model's up to the axes' rounding."""
    from scidiff.config import load_config
    from scidiff.models import ScIDiffModel
    from scidiff.tasks.train import _streamed_model

    config = load_config(None, {"model": {"gene_dim": 20, "hidden_dim": 16, "num_layers": 1, "latent_dim": 5}})
    cells, model = _streamed_model(files["anndata"], config, ["cell_type"], progress=False)
    assert model.resolve_observed() and bool(model.detection.fitted)
    ref = ScIDiffModel.from_data(setup_anndata(adata, n_top_genes=20, condition_keys=["cell_type"]),
                                 **config.model.model_kwargs())
    assert len(cells.sample_x(10**6)) == N_CELLS  # the whole file: the same cells as in memory
    np.testing.assert_allclose(model.detection.detection, ref.detection.detection, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.detection.levels, ref.detection.levels, rtol=0, atol=1e-4)
    half = cells.sample_x(N_CELLS // 2, seed=1)
    assert 0 < len(half) < N_CELLS and half.shape[1] == 20


def test_generate_to_file_equals_generate_in_memory(files, adata, tmp_path):
    from scidiff.tasks import generate as generation
    from scidiff.models import ScIDiffModel

    data = setup_anndata(adata, n_top_genes=15, condition_keys=["cell_type"])
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=50)
    cells, genes = generation.generate_to_file(model, 11, tmp_path / "g.h5ad", [{"cell_type": "T"}], steps=3,
                                             seed=5, chunk_size=4, progress=False)
    ref = generation.generate(model, 11, {"cell_type": "T"}, steps=3, seed=5, chunk_size=4, progress=False)
    got = ad.read_h5ad(tmp_path / "g.h5ad")
    assert (cells, genes) == (11, 15)
    np.testing.assert_array_equal(got.X, ref.X)
    assert list(got.obs_names) == list(ref.obs_names) and list(got.var_names) == list(ref.var_names)
    assert list(got.obs["cell_type"]) == ["T"] * 11 and got.uns["scidiff"]["seed"] == 5


@pytest.mark.parametrize("sparse,compression", [(True, None), (True, "gzip"), (False, None), (False, "gzip")])
def test_writer_round_trips_through_anndata(tmp_path, adata, sparse, compression):
    path = tmp_path / "w.h5ad"
    x = adata.X
    with H5adWriter(path, GENES, sparse=sparse, compression=compression, chunk_values=500, threads=2) as w:
        for a in range(0, N_CELLS, 37):
            part = x[a:a + 37]
            w.append(part if sparse else part.toarray(), obs={"cell_type": adata.obs.cell_type.iloc[a:a + 37]},
                     obs_names=adata.obs_names[a:a + 37])
        assert not path.exists()  # only a temporary name until complete
    back = ad.read_h5ad(path)
    assert (sp.csr_matrix(back.X) != x).nnz == 0 and list(back.var_names) == GENES
    assert list(back.obs_names) == list(adata.obs_names)
    assert list(back.obs["cell_type"].astype(str)) == list(adata.obs["cell_type"].astype(str))
    with pytest.raises(RuntimeError):
        with H5adWriter(tmp_path / "broken.h5ad", GENES) as w:
            w.append(x[:3].toarray())
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["w.h5ad"]


# -- hostile files -------------------------------------------------------------------------------

def _copy(files, tmp_path, name="anndata"):
    path = str(tmp_path / f"hostile-{name}.h5ad")
    shutil.copy(files[name], path)
    return path


def _read_all(path, backend, **kw):
    reader = MatrixReader(path, backend=backend, **kw)
    t = Transform.build(reader.var_names, GENES[:50], counts=True)
    block = reader.read([[0, reader.n_cells]])
    return reader.densify(block, np.arange(reader.n_cells), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_structure_is_a_clear_error(files, tmp_path, backend):
    path = _copy(files, tmp_path)
    with h5py.File(path, "r+") as f:
        ip = f["X/indptr"]
        ip[10], ip[11] = ip[11] + 5, ip[11]
    with pytest.raises(ValueError, match=r"hostile-anndata.h5ad': X/indptr is not monotone: cell 'c10' \(row 10\)"):
        MatrixReader(path, backend=backend)

    path = _copy(files, tmp_path)
    with h5py.File(path, "r+") as f:
        f["X"].attrs["shape"] = np.array([N_CELLS + 4, N_GENES])
    with pytest.raises(ValueError, match=r"X/indptr has 204 entries but the shape attribute says 207 cells"):
        MatrixReader(path, backend=backend)
    with h5py.File(path, "r+") as f:
        f["X"].attrs["shape"] = np.array([N_CELLS, N_GENES - 10])
    with pytest.raises(ValueError, match=r"110 genes \(shape attribute\) but var has 120"):
        MatrixReader(path, backend=backend)

    path = _copy(files, tmp_path)
    with h5py.File(path, "r+") as f:
        data = f["X/data"][...]
        del f["X/data"]
        f["X"].create_dataset("data", data=data[:-40])
    with pytest.raises(ValueError, match=r"hostile-anndata.h5ad': X/data has \d+ values but indptr ends at \d+ "
                                         r"\(truncated dataset"):
        MatrixReader(path, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_content_is_a_clear_error(files, tmp_path, backend):
    path = _copy(files, tmp_path)
    with h5py.File(path, "r+") as f:
        f["X/indices"][f["X/indptr"][9] + 1] = N_GENES + 3
    with pytest.raises(ValueError, match=rf"hostile-anndata.h5ad': X/indices of cell 'c9' \(row 9\) holds column "
                                         rf"{N_GENES + 3}, outside \[0, {N_GENES}\)"):
        _read_all(path, backend)
    # the loader's background thread hands the error to the caller
    mem_spec = setup_anndata(make_adata(), genes=GENES[:5]).spec
    with pytest.raises(ValueError, match="outside"):
        list(stream_like(mem_spec, path, backend=backend).loader(batch_size=16))

    path = _copy(files, tmp_path, "gzip")
    m = open_matrix(path).arrays["data"]
    at, size = int(m.chunk_addr[1]), int(m.chunk_bytes[1])
    with open(path, "r+b") as fh:
        fh.seek(at + size // 3)
        fh.write(bytes(64))
    with pytest.raises(ValueError, match="inflate|X/data"):
        _read_all(path, backend)

    path = _copy(files, tmp_path)
    reader = MatrixReader(path, backend=backend)  # the file is cut short after it was opened
    os.truncate(path, int(open_matrix(path).arrays["indices"].chunk_addr[0]) + 8)
    with pytest.raises((ValueError, OSError), match="truncated|X/indices|X/data"):
        reader.read([[0, N_CELLS]])
    with pytest.raises(ValueError, match="truncated|could not open"):
        MatrixReader(path, backend=backend)


def test_csc_and_missing_keys_say_what_to_do(tmp_path, adata):
    path = tmp_path / "csc.h5ad"
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(path)
    with pytest.raises(ValueError, match=r"stored as CSC.*csr_matrix"):
        MatrixReader(path)
    with pytest.raises(KeyError, match=r"layer 'nope' is not in .*layers available"):
        MatrixReader(path, layer="nope")
    with pytest.raises(KeyError, match=r"obs key\(s\) \['batch'\] not in .*available obs keys"):
        setup_streaming(path, layer="counts", condition_keys=["batch"])


def test_streamed_and_in_memory_readers_name_the_same_cell(files, tmp_path):
    from scidiff.data import read_h5ad
    from scidiff.data.streaming import StreamingLoader

    path = _copy(files, tmp_path)
    with h5py.File(path, "r+") as f:
        f["X/indices"][f["X/indptr"][41]] = 10_000_000
    with pytest.raises(ValueError) as in_memory:
        read_h5ad(path)
    assert str(in_memory.value) == (f"{path!r}: X/indices of cell 'c41' (row 41) holds column 10000000, "
                                    f"outside [0, {N_GENES})")
    for backend in BACKENDS:
        with pytest.raises(ValueError) as streamed:
            _read_all(path, backend)
        assert str(streamed.value) == str(in_memory.value)
        reader = MatrixReader(path, backend=backend)
        if reader.fused:  # the C++ read + densify in one pass
            t = Transform.build(reader.var_names, GENES[:50], counts=True)
            with pytest.raises(ValueError) as fused:
                reader.read_densify([[30, 60]], np.arange(30), t, np.empty((30, 50), np.float32))
            assert str(fused.value) == str(in_memory.value)
        with pytest.raises(ValueError) as loaded:
            list(StreamingLoader(reader, Transform.build(reader.var_names, GENES[:50], counts=True), batch_size=16,
                                 shuffle=False))
        assert str(loaded.value) == str(in_memory.value)


@pytest.mark.parametrize("perturbation", [False, True])
def test_streamed_and_in_memory_name_the_same_unlabelled_cells(tmp_path, adata, perturbation):
    a = adata.copy()
    labels = a.obs["cell_type"].astype(object).to_numpy()
    labels[[5, 9]] = None
    a.obs["cell_type"] = pd.Categorical(labels.tolist() if not perturbation else
                                        [v if v is None or v != "B" else "control" for v in labels])
    path = str(tmp_path / "unlabelled.h5ad")
    a.write_h5ad(path)
    kw = {"condition_keys": ["cell_type"], "perturbation_keys": ["cell_type"] if perturbation else []}
    with pytest.raises(ValueError) as in_memory:
        setup_anndata(path, **kw)
    with pytest.raises(ValueError) as streamed:
        setup_streaming(path, **kw)
    assert "cells ['c5', 'c9']" in str(in_memory.value)  # obs names, not positions
    assert str(streamed.value) == str(in_memory.value)


def test_streaming_refuses_all_zero_and_duplicated_genes(tmp_path, adata):
    zero = adata.copy()
    zero.X = sp.csr_matrix(zero.shape, dtype=np.float32)
    zero.write_h5ad(tmp_path / "zero.h5ad")
    with pytest.raises(ValueError, match=r"X of '.*zero.h5ad' is all zeros: every cell has zero counts"):
        setup_streaming(tmp_path / "zero.h5ad", n_top_genes=20)
    from scidiff.data.stream_setup import _sample_runs

    (start, stop), = _sample_runs(N_CELLS, 10, 64, 0)
    part = adata.copy()
    x = part.X.tolil()
    x[start:stop] = 0  # the one block the sample reads
    part.X = x.tocsr()
    part.write_h5ad(tmp_path / "part.h5ad")
    with pytest.raises(ValueError, match=rf"the {stop - start} cells sampled .* all have zero counts, though other "
                                         r"cells do not; sample more cells \(hvg_cells=...\)"):
        setup_streaming(tmp_path / "part.h5ad", n_top_genes=20, hvg_cells=10, block_size=64, seed=0)
    dup = adata.copy()
    dup.var_names = GENES[:3] + [GENES[2]] + GENES[4:]
    dup.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(ValueError, match=rf"1 duplicated gene name\(s\): '{GENES[2]}' \(columns \[2, 3\]\)"):
        setup_streaming(tmp_path / "dup.h5ad", n_top_genes=20)


def test_streamed_gene_choice_is_exact_and_equals_memory(tmp_path, kang_small):
    path = tmp_path / "kang.h5ad"
    kang_small.write_h5ad(path)
    streamed = setup_streaming(path, layer="counts", n_top_genes=500, covariance=False)
    assert streamed.spec.gene_names == setup_anndata(kang_small, layer="counts", n_top_genes=500).spec.gene_names
    assert streamed.spec.n_genes == 500  # scanpy's own cut keeps 502 here (ties)


@pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")
def test_extension_checks_bounds_before_writing():
    from scidiff.data import _streaming as ext

    out = np.full((2, 3), 7.0, np.float32)
    indptr = np.array([0, 2, 3], np.int64)
    indices = np.array([0, 1, 2], np.int32)
    data = np.ones(3, np.float32)
    gene_map = np.array([0, 1, 2], np.int32)
    with pytest.raises(ValueError, match="outside the block"):
        ext.densify_csr(indptr, indices, data, np.array([0, 2]), gene_map, out, True, 1e4, True, None, None, 1)
    with pytest.raises(ValueError, match="not monotone"):
        ext.densify_csr(np.array([0, 3, 2]), indices, data, np.array([0, 1]), gene_map, out, True, 1e4, True,
                        None, None, 1)
    with pytest.raises(ValueError, match="indptr ends at 9"):
        ext.densify_csr(np.array([0, 2, 9]), indices, data, np.array([0, 1]), gene_map, out, True, 1e4, True,
                        None, None, 1)
    assert (out == 7.0).all()  # nothing was written
    with pytest.raises(ext.ColumnIndexError, match="column index 5"):  # a ValueError the reader explains
        ext.densify_csr(indptr, np.array([0, 5, 2], np.int32), data, np.array([0, 1]), gene_map, out, False, 1.0,
                        False, None, None, 1)
    with pytest.raises(ValueError, match="float32 of shape"):
        ext.densify_csr(indptr, indices, data, np.array([0, 1]), gene_map, np.zeros((2, 3)), False, 1.0, False,
                        None, None, 1)


@pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")
def test_extension_read_checks_ranges_before_reading(files):
    from scidiff.data import _streaming as ext

    m = open_matrix(files["anndata"]).arrays["data"]
    f = ext.File(files["anndata"])
    arr = ext.Array(f, m.name, m.dtype.itemsize, m.rows, m.cols, m.chunked, m.offset, m.chunk_shape[0],
                    m.chunk_shape[1], m.chunk_row0, m.chunk_col0, m.chunk_addr, m.chunk_bytes, m.chunk_mask,
                    m.filters, m.fill)
    out = np.full(10, -1.0, np.float32)
    with pytest.raises(ValueError, match="outside"):
        ext.read([(arr, np.array([0, m.rows - 2]), np.array([5, m.rows + 3]), out)], 2)
    with pytest.raises(ValueError, match="output buffer holds 40 bytes"):
        ext.read([(arr, np.array([0]), np.array([11]), out)], 2)
    assert (out == -1.0).all()
    with pytest.raises(ValueError, match="past the end of the file|truncated"):
        ext.Array(f, "bad", 4, 10, 1, False, f.size - 8, 0, 1, *[np.zeros(0, t) for t in
                  (np.int64, np.int64, np.uint64, np.uint64, np.uint32)], [], b"")


# -- fuzz: byte flips in the stored arrays --------------------------------------------------------

def test_byte_flips_never_crash(files, tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    sources = {name: open(files[name], "rb").read() for name in ("anndata", "gzip")}
    regions = {}
    for name in sources:
        maps = open_matrix(files[name]).arrays
        regions[name] = [(int(a), int(a + b)) for m in maps.values() for a, b in zip(m.chunk_addr, m.chunk_bytes)]

    @hypothesis.settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(name=st.sampled_from(sorted(sources)), picks=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6))
    def flip(name, picks):
        raw = bytearray(sources[name])
        for region, offset, mask in picks:
            lo, hi = regions[name][region % len(regions[name])]
            raw[lo + offset % (hi - lo)] ^= mask
        path = tmp_path / f"fuzz-{name}.h5ad"
        path.write_bytes(bytes(raw))
        results = {}
        for backend in BACKENDS:
            try:
                results[backend] = _read_all(str(path), backend)
            except (ValueError, OSError, KeyError) as exc:
                results[backend] = exc
        arrays = [r for r in results.values() if isinstance(r, np.ndarray)]
        if len(arrays) == 2:  # where both backends read the file, they agree
            np.testing.assert_allclose(arrays[0], arrays[1], rtol=1e-5, atol=1e-5, equal_nan=True)

    flip()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_densify_matches_cpu(files, adata):
    from scidiff.data.streaming import cuda_densify_available

    if not cuda_densify_available():
        pytest.skip("the extension was built without SCIDIFF_CUDA=ON")
    mem = setup_anndata(adata, genes=GENES[:50], scaling="gene")
    cells = stream_like(mem.spec, files["anndata"])
    gpu = torch.cat([b["x"].cpu() for b in cells.loader(batch_size=32, shuffle=False, densify_device="cuda")])
    torch.testing.assert_close(gpu, mem.x, rtol=1e-5, atol=1e-5)
