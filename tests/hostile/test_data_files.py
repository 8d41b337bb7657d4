"""Broken data files through the real ``scidiff`` command: each file is built from real data (the
300 Kang cells of ``kang_file``, or a shared file), broken with h5py or anndata, and handed to the
CLI in a child process. Every case must fail cleanly (exit 2, no traceback) with a message that
names the file and the array, key, gene or cell at fault; the 10x case must train."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import assert_clean_error, run_cli

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
BAD_COLUMN, BAD_ROW = 10_000_000, 17


def shared(name: str) -> str:
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"needs the shared real data file {path}")
    return path


# -- building broken files ---------------------------------------------------------------------------

def _var_index(f: h5py.File, group: str = "var") -> h5py.Dataset:
    name = f[group].attrs.get("_index", "_index")
    return f[group][name.decode() if isinstance(name, bytes) else name]


def out_of_range(f: h5py.File, key: str = "X") -> None:
    """The first stored value of cell BAD_ROW points at column BAD_COLUMN."""
    ip = f[f"{key}/indptr"]
    assert ip[BAD_ROW + 1] > ip[BAD_ROW], "the test needs a cell with values"
    f[f"{key}/indices"][ip[BAD_ROW]] = BAD_COLUMN


def not_monotone(f: h5py.File) -> None:
    ip = f["X/indptr"]
    ip[10] = ip[11] + 5  # cell 10 ends 5 values before it starts


def past_nnz(f: h5py.File) -> None:
    ip = f["X/indptr"]
    ip[-1] = len(f["X/data"]) + 100


def _set_value(value):
    def edit(f: h5py.File) -> None:
        f["X/data"][5] = value
    return edit


def duplicate_gene(f: h5py.File) -> None:
    index = _var_index(f)
    index[3] = index[2]


def damaged_heap(data: bytearray) -> bytes:
    """Zero the header of the third string in the file's first HDF5 global heap: a free-space
    object of size 0, on which libhdf5 itself loops forever."""
    p = data.find(b"GCOL") + 16
    for _ in range(2):
        p += 16 + (int.from_bytes(data[p + 8:p + 16], "little") + 7) // 8 * 8
    data[p:p + 16] = bytes(16)
    return bytes(data)


def broken(src, folder, name: str, edit) -> str:
    """A copy of ``src`` in ``folder`` changed by ``edit(h5py.File)``."""
    path = str(folder / name)
    shutil.copy(src, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def rewritten(src, folder, name: str, change) -> str:
    """``src`` read with anndata, changed by ``change(adata)`` and written to ``folder/name``."""
    adata = ad.read_h5ad(src)
    change(adata)
    path = str(folder / name)
    adata.write_h5ad(path)
    return path


def _all_zero(a: ad.AnnData) -> None:
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    del a.layers["counts"]


def _tpm(a: ad.AnnData) -> None:
    counts = sp.csr_matrix(a.layers["counts"], dtype=np.float64)
    counts = sp.diags(1e6 / np.asarray(counts.sum(1)).ravel()) @ counts
    a.X = sp.csr_matrix(counts / 3.7, dtype=np.float32)  # per-kilobase-like, far from integers


def _with_raw(a: ad.AnnData) -> None:
    a.raw = a.copy()


def _unlabelled(a: ad.AnnData) -> None:
    """Ten cells without a cell type (a file whose annotation left some cells out)."""
    labels = a.obs["cell_type"].astype(object)
    labels.iloc[:10] = np.nan
    a.obs["cell_type"] = labels.astype("category")


def _unperturbed_unlabelled(a: ad.AnnData) -> None:
    """The control cells without a perturbation label (screens that write none for no guide)."""
    labels = a.obs["condition"].astype(object)
    labels[labels == "control"] = np.nan
    a.obs["condition"] = labels.astype("category")


def _csc(a: ad.AnnData) -> None:
    a.X = sp.csc_matrix(a.X)


@pytest.fixture(scope="module")
def files(tmp_path_factory, kang_file):
    """Every broken file, built once."""
    root = tmp_path_factory.mktemp("broken_data")
    out = {
        "out_of_range": broken(kang_file, root, "out_of_range.h5ad", out_of_range),
        "layer_out_of_range": broken(kang_file, root, "layer_out_of_range.h5ad",
                                     lambda f: out_of_range(f, "layers/counts")),
        "not_monotone": broken(kang_file, root, "not_monotone.h5ad", not_monotone),
        "past_nnz": broken(kang_file, root, "past_nnz.h5ad", past_nnz),
        "nan": broken(kang_file, root, "nan.h5ad", _set_value(np.nan)),
        "negative": broken(kang_file, root, "negative.h5ad", _set_value(-2.0)),
        "duplicate_gene": broken(kang_file, root, "duplicate_gene.h5ad", duplicate_gene),
        "all_zero": rewritten(kang_file, root, "all_zero.h5ad", _all_zero),
        "tpm": rewritten(kang_file, root, "tpm.h5ad", _tpm),
        "csc": rewritten(kang_file, root, "csc.h5ad", _csc),
        "unlabelled": rewritten(kang_file, root, "unlabelled.h5ad", _unlabelled),
        "unperturbed_unlabelled": rewritten(kang_file, root, "unperturbed_unlabelled.h5ad", _unperturbed_unlabelled),
    }
    raw = rewritten(kang_file, root, "with_raw.h5ad", _with_raw)
    out["raw_out_of_range"] = broken(raw, root, "raw_out_of_range.h5ad", lambda f: out_of_range(f, "raw/X"))
    data = open(kang_file, "rb").read()
    for name, content in (("truncated", data[: len(data) * 2 // 3]), ("empty", b""),
                          ("damaged_heap", damaged_heap(bytearray(data))),
                          ("not_hdf5", b"cell,gene,count\nAAAC,CD3D,4\n")):
        out[name] = str(root / f"{name}.h5ad")
        with open(out[name], "wb") as fh:
            fh.write(content)
    out["missing"] = str(root / "no_such_file.h5ad")
    return out


@pytest.fixture(scope="module")
def cell17(kang_file):
    return str(ad.read_h5ad(kang_file, backed="r").obs_names[BAD_ROW])


def _train(data, tmp_path, config, *extra):
    return run_cli("train", "--data", data, "--out", tmp_path / "run", "--config", config,
                   "--condition-keys", "cell_type,condition", *extra)


def _message(result) -> str:
    """The error line the CLI printed, without the ``scidiff CMD: error:`` prefix."""
    lines = [ln for ln in result.stderr.splitlines() if ": error: " in ln]
    assert lines, result.stderr[-2000:]
    return lines[-1].split(": error: ", 1)[1]


# -- an out-of-range column index: the same message from every command and both readers ------------

@pytest.mark.parametrize("command", ["train", "train --streaming", "predict", "denoise", "evaluate"])
def test_out_of_range_column_is_named_by_every_command(command, files, tiny_run, tiny_config, kang_file, cell17,
                                                       tmp_path):
    path = files["out_of_range"]
    if command.startswith("train"):
        result = _train(path, tmp_path, tiny_config, *command.split()[1:])
    elif command == "predict":
        result = run_cli("predict", "--model", tiny_run, "--data", path, "--target", "condition=stimulated",
                         "--out", tmp_path / "o.h5ad")
    elif command == "denoise":
        result = run_cli("denoise", "--model", tiny_run, "--data", path, "--out", tmp_path / "o.h5ad")
    else:
        result = run_cli("evaluate", "--real", path, "--generated", kang_file, "--out", tmp_path / "report")
    assert_clean_error(result, path, "X/indices", f"(row {BAD_ROW})", str(BAD_COLUMN))
    assert _message(result) == (f"{path!r}: X/indices of cell {cell17!r} (row {BAD_ROW}) holds column "
                                f"{BAD_COLUMN}, outside [0, 6998)")
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.parametrize("name,flags,key", [("layer_out_of_range", ["--layer", "counts"], "layers/counts/indices"),
                                            ("raw_out_of_range", ["--use-raw"], "raw/X/indices")])
def test_out_of_range_in_a_layer_or_raw(name, flags, key, files, tiny_config, tmp_path):
    result = _train(files[name], tmp_path, tiny_config, *flags)
    assert_clean_error(result, files[name], key, f"(row {BAD_ROW})", str(BAD_COLUMN), "outside [0, 6998)")


# -- broken structure and values, in memory and streamed -------------------------------------------

CASES = [  # file, extra train flags, what the message must name
    ("not_monotone", [], ["X/indptr is not monotone", "(row 10)"]),
    ("not_monotone", ["--streaming"], ["X/indptr is not monotone", "(row 10)"]),
    ("past_nnz", [], ["X/data has", "indptr ends at"]),
    ("all_zero", [], ["X of", "every cell has zero counts"]),
    ("all_zero", ["--streaming"], ["X of", "every cell has zero counts"]),
    ("tpm", [], ["X of", "neither counts nor log1p", "max 1", "non-integer", "--layer", "--use-raw",
                 "input: log1p"]),
    ("duplicate_gene", [], ["duplicated gene name", "(columns [2, 3])", "var_names_make_unique()"]),
    ("duplicate_gene", ["--streaming"], ["duplicated gene name", "(columns [2, 3])", "var_names_make_unique()"]),
    ("nan", [], ["X of", "1 NaN or infinite"]),
    ("negative", [], ["X of", "negative values", "--use-raw"]),
    ("csc", ["--streaming"], ["X of", "CSC", "csr_matrix"]),
    ("unlabelled", [], ["obs['cell_type']", "10 missing values", "and 7 more", ".notna()", ".fillna('unknown')"]),
    ("unlabelled", ["--streaming"], ["obs['cell_type']", "10 missing values", "and 7 more", ".notna()"]),
    ("unperturbed_unlabelled", ["--perturbation-keys", "condition", "--control-labels", "control"],
     ["obs['condition']", "missing values", ".notna()", "call them control", ".fillna('control')"]),
    ("unperturbed_unlabelled", ["--perturbation-keys", "condition", "--control-labels", "control", "--streaming"],
     ["obs['condition']", "missing values", ".notna()", "call them control", ".fillna('control')"]),
    ("truncated", [], ["could not read"]),
    ("truncated", ["--streaming"], ["truncated"]),
    ("empty", [], ["could not read"]),
    ("not_hdf5", [], ["could not read"]),
    ("not_hdf5", ["--streaming"], ["could not open"]),
    ("missing", [], ["no such file"]),
    ("damaged_heap", [], ["is damaged", "global heap", "loop forever"]),
    ("damaged_heap", ["--streaming"], ["is damaged", "global heap", "loop forever"]),
]


@pytest.mark.parametrize("name,flags,names", CASES, ids=[f"{c[0]}{''.join(c[1])}" for c in CASES])
def test_broken_file_is_refused_cleanly(name, flags, names, files, tiny_config, tmp_path):
    result = _train(files[name], tmp_path, tiny_config, *flags)
    assert_clean_error(result, files[name], *names)
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("flags,names", [(["--layer", "spliced"], ["layer 'spliced'", "layers available: ['counts']"]),
                                         (["--condition-keys", "cell_type,donor"], ["['donor']", "'cell_type'"])])
def test_missing_layer_or_obs_key_lists_what_is_there(flags, names, kang_file, tiny_config, tmp_path):
    result = run_cli("train", "--data", kang_file, "--out", tmp_path / "run", "--config", tiny_config, *flags)
    assert_clean_error(result, kang_file, *names)


def test_wrong_control_label_names_the_key_and_the_values_present(kang_file, tiny_config, tmp_path):
    result = _train(kang_file, tmp_path, tiny_config, "--perturbation-keys", "condition", "--control-labels", "ctl")
    assert_clean_error(result, kang_file, "obs['condition']", "['ctl']", "'control' (", "'stimulated' (")


def test_scaled_input_points_to_raw(tiny_config, tmp_path):
    path = shared("pbmc68k_reduced.h5ad")
    result = run_cli("train", "--data", path, "--out", tmp_path / "run", "--config", tiny_config)
    assert_clean_error(result, path, "negative values", "--use-raw")


def test_tpm_trains_when_the_config_insists_on_log1p(files, tmp_path):
    config = tmp_path / "insist.yaml"
    config.write_text("data: {input: log1p}\n" + "model: {gene_dim: 50, hidden_dim: 32, num_layers: 1, "
                      "num_timesteps: 50, conditioning_dim: 8, latent_dim: 8}\ntraining: {batch_size: 100, "
                      "num_epochs: 1, warmup_steps: 1, early_stopping_patience: null}\n")
    result = run_cli("train", "--data", files["tpm"], "--out", tmp_path / "run", "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]


# -- 10x Genomics HDF5 ---------------------------------------------------------------------------------

def test_10x_h5_trains(tiny_config, tmp_path):
    path = shared("10x_v3_filtered_feature_bc_matrix.h5")
    result = run_cli("train", "--data", path, "--out", tmp_path / "run", "--config", tiny_config, "--n-genes", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    from scidiff.training import load_model

    spec = load_model(tmp_path / "run").data_spec
    assert spec.input_kind == "counts" and spec.n_genes == 60


def test_10x_h5_under_streaming_says_what_to_do(tiny_config, tmp_path):
    path = shared("10x_v3_filtered_feature_bc_matrix.h5")
    result = run_cli("train", "--data", path, "--out", tmp_path / "run", "--config", tiny_config, "--streaming")
    assert_clean_error(result, path, "10x Genomics HDF5", "without --streaming")


# -- an interrupted write -----------------------------------------------------------------------------

def test_killed_sample_leaves_a_traceable_temporary_that_the_next_write_removes(tiny_run, tmp_path):
    out = tmp_path / "X.h5ad"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "scidiff", "sample", "--model", str(tiny_run), "-n", "5000000",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    pattern = re.compile(rf"^\.tmp-{proc.pid}-[0-9a-f]+\.X\.h5ad$")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not any(pattern.match(n) for n in os.listdir(tmp_path)):
            assert proc.poll() is None, "sample ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [n for n in os.listdir(tmp_path) if pattern.match(n)]
    assert left and not out.exists(), os.listdir(tmp_path)
    result = run_cli("sample", "--model", tiny_run, "-n", "5", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["X.h5ad"]  # the dead writer's temporary is gone
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
    assert ad.read_h5ad(out).n_obs == 5
