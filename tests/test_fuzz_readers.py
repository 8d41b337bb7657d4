"""Fuzz the readers with damaged real files: byte flips, zeroed runs and truncations of a small
Kang ``.h5ad`` (300 cells x 300 genes, written uncompressed and with gzip) go to the in-memory
reader (``read_h5ad`` + ``setup_anndata``) and to the streaming reader (the C++ extension and its
h5py + numpy fallback). Each must read the file or refuse it with an exception the CLI turns into
a clean error (exit 2): ``ValueError``, ``KeyError`` or ``FileNotFoundError`` whose message names
the file; never a signal, a hang or another exception. (Damaged HDF5 metadata that would crash or
hang libhdf5 itself is refused by the readers' probe, :mod:`scidiff.data.hdf5_guard`.)

The cases run in a child process (this file run as a script), so a segfault fails the test
instead of killing pytest; each case has a watchdog (``faulthandler``) and the whole loop a time
budget. Hypothesis is derandomised: the same cases run every time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

CLEAN = (ValueError, KeyError, FileNotFoundError)  # what scidiff's CLI maps to exit status 2
CASE_TIMEOUT_S = 20  # one case; a hang is a failure
PROBE_TIMEOUT_S = 8  # the readers' metadata probe (scidiff.data.hdf5_guard), well inside a case
BUDGET_S = 40  # all cases (the child stops starting new ones after this)
MAX_EXAMPLES = 1500


# -- the child: the fuzz loop ---------------------------------------------------------------------------

def _readers(path: str) -> dict:
    """Run every reader on ``path``: reader name -> "ok" or the clean exception's type name.
    Anything else propagates."""
    import warnings

    from scidiff.data import read_h5ad, setup_anndata
    from scidiff.data.streaming import MatrixReader, Transform, extension_available

    outcome = {}

    def attempt(name, fn):
        try:
            fn()
            outcome[name] = "ok"
        except CLEAN as exc:
            if path not in str(exc):
                raise AssertionError(f"{name}: the message does not name the file: {exc}") from exc
            outcome[name] = type(exc).__name__

    def in_memory():
        adata = read_h5ad(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup_anndata(adata, n_top_genes=50, condition_keys=["cell_type"])
            setup_anndata(adata, layer="counts", n_top_genes=None, condition_keys=["condition"])

    def streamed(backend):
        def run():
            with MatrixReader(path, backend=backend) as reader:
                t = Transform.build(reader.var_names, reader.var_names[::6], counts=False)
                everything = np.array([[0, reader.n_cells]])
                reader.densify(reader.read(everything), np.arange(reader.n_cells), t)
                if reader.fused:
                    out = np.empty((reader.n_cells, t.n_genes), np.float32)
                    reader.read_densify(everything, np.arange(reader.n_cells), t, out)
        return run

    attempt("memory", in_memory)
    for backend in (["native"] if extension_available() else []) + ["python"]:
        attempt(backend, streamed(backend))
    return outcome


def _mutate(raw: bytes, edits, cut) -> bytes:
    """``edits``: ``(position, xor mask, length)`` byte runs (mask 0 zeroes the run); ``cut``:
    keep this fraction of the file (1.0 keeps it whole)."""
    data = bytearray(raw)
    for pos, mask, length in edits:
        at = pos % len(data)
        for i in range(at, min(at + length, len(data))):
            data[i] = data[i] ^ mask if mask else 0
    return bytes(data[: max(0, int(len(data) * cut))])


def child(workdir: str) -> None:
    """Run the fuzz cases on ``workdir/{plain,gzip}.h5ad``; write ``summary.json``. Before each
    case its description goes to ``current.json`` and its file to ``current.h5ad``, so a case that
    kills the process can be named by the parent."""
    import faulthandler

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    sources = {name: open(os.path.join(workdir, f"{name}.h5ad"), "rb").read() for name in ("plain", "gzip")}
    case_file = os.path.join(workdir, "current.h5ad")
    summary = {"cases": 0, "failures": [], "outcomes": {}, "skipped": 0}
    start = time.monotonic()

    edit = st.tuples(st.integers(0, 2**31), st.sampled_from([0, 1, 0x80, 0xFF, 0x10, 0x04]), st.integers(1, 16))
    cut = st.one_of(st.just(1.0), st.just(1.0), st.just(1.0), st.floats(0.0, 1.0, allow_nan=False))  # 1 in 4 cut

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(source=st.sampled_from(sorted(sources)), edits=st.lists(edit, max_size=6), cut=cut)
    def case(source, edits, cut):
        if time.monotonic() - start > BUDGET_S:
            summary["skipped"] += 1
            return
        description = {"source": source, "edits": edits, "cut": cut}
        with open(os.path.join(workdir, "current.json"), "w") as fh:
            json.dump(description, fh)
        with open(case_file, "wb") as fh:
            fh.write(_mutate(sources[source], edits, cut))
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        try:
            outcome = _readers(case_file)
        except BaseException as exc:  # not a clean error: record it, go on
            import traceback

            summary["failures"].append({**description, "error": "".join(traceback.format_exception(exc))[-3000:]})
        else:
            for reader, result in outcome.items():
                key = f"{reader}:{result}"
                summary["outcomes"][key] = summary["outcomes"].get(key, 0) + 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        summary["cases"] += 1

    case()
    with open(os.path.join(workdir, "summary.json"), "w") as fh:
        json.dump(summary, fh)


# -- the test: builds the files, runs the child, reads its summary --------------------------------------

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory, kang_small):
    """300 Kang cells x their 300 most often detected genes, log1p ``X`` + ``layers['counts']``
    and two obs columns, written uncompressed and with gzip."""
    import anndata as ad

    pytest.importorskip("hypothesis")
    detected = np.asarray((kang_small.layers["counts"] > 0).sum(0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:300])
    small = ad.AnnData(X=kang_small.X[:, genes], obs=kang_small.obs[["cell_type", "condition"]].copy(),
                       var=kang_small.var.iloc[genes][[]].copy())
    small.layers["counts"] = kang_small.layers["counts"][:, genes]
    root = tmp_path_factory.mktemp("fuzz")
    small.write_h5ad(root / "plain.h5ad")
    small.write_h5ad(root / "gzip.h5ad", compression="gzip")
    return root


def test_damaged_files_never_crash_or_hang(fuzz_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", SCIDIFF_HDF5_PROBE_TIMEOUT=str(PROBE_TIMEOUT_S))
    try:
        result = subprocess.run([sys.executable, __file__, str(fuzz_dir)], capture_output=True, text=True,
                                timeout=BUDGET_S + 2 * CASE_TIMEOUT_S + 60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fuzz loop hung on {_current(fuzz_dir)}")
    assert result.returncode == 0, (f"the fuzz child died (status {result.returncode}) on {_current(fuzz_dir)} "
                                    f"(file kept at {fuzz_dir / 'current.h5ad'}):\n{result.stderr[-4000:]}")
    summary = json.loads((fuzz_dir / "summary.json").read_text())
    assert not summary["failures"], (f"{len(summary['failures'])} damaged files raised an unclean exception; "
                                     f"the first:\n{json.dumps(summary['failures'][0], indent=1)}")
    outcomes = summary["outcomes"]
    assert summary["cases"] >= 40, summary  # the budget let a meaningful number of cases run
    # the cases exercise both sides: files read and files refused, by every reader
    for reader in {k.split(":")[0] for k in outcomes}:
        assert outcomes.get(f"{reader}:ok", 0) > 0 and any(
            k.startswith(f"{reader}:") and not k.endswith(":ok") for k in outcomes), outcomes


def _current(folder) -> str:
    path = folder / "current.json"
    return path.read_text() if path.exists() else "(no case started)"


if __name__ == "__main__":
    child(sys.argv[1])
