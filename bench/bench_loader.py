"""Streaming loader throughput on a generated atlas-sized .h5ad (issue 3).

Generates its own CSR counts file (default 200k cells x 20k genes, about 2,000 nonzeros a cell,
float32 data / int32 indices, anndata's default chunking from h5py's chunk guess), once
uncompressed and once gzip (level 4, the chunks compressed on threads), then measures in one
run, each method in its own process (so each has its own peak RSS), warm page cache, producing
normalised 2,000-gene batches of 256 cells in model space (library size over all genes,
log1p, gene subset, (x - offset) / scale):

- ``anndata_backed``: ``anndata.read_h5ad(backed="r")``, random sorted 256-cell index batches;
- ``h5py_read_direct``: one serial ``read_direct`` of a random contiguous 256-cell range per
  batch (data + indices), scipy + numpy normalisation (the fastest plain h5py pattern);
- ``python_path``: scidiff's StreamingLoader, h5py + numpy backend (block-shuffled);
- ``extension``: scidiff's StreamingLoader with the C++ reader (block-shuffled), streaming the
  whole file; its peak RSS is the "whole file" memory figure.

Then trains a few hundred steps from the uncompressed file with ``setup_streaming`` (genes from
a subsample, scaling and the 64-dim latent from one streamed pass) under an address-space limit
smaller than the file (``--memory-limit-gb``), sampling RSS as it goes, and checks that loading
the same file into memory fails under that limit.

    python bench/bench_loader.py [--cells 200000] [--genes 20000] [--nnz 2000] [--seconds 12]
        [--train-steps 300] [--memory-limit-gb 3] [--workdir DIR] [--keep] [--out bench/results/loader.json]

The generated files (several GB) are deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 256
N_MODEL_GENES = 2000


# -- the file --------------------------------------------------------------------------------------

def generate(workdir: str, cells: int, genes: int, nnz: int, seed: int = 0) -> dict:
    """Write plain.h5ad and gzip.h5ad in one pass; returns sizes and seconds."""
    import scipy.sparse as sp
    from h5py._hl.filters import guess_chunk

    from scidiff.data.h5ad_writer import H5adWriter

    rng = np.random.default_rng(seed)
    rate = rng.lognormal(-0.5, 1.0, genes).astype(np.float32)  # gene-dependent expression
    types = np.array([f"type{i}" for i in range(8)])
    chunk = guess_chunk((cells * nnz,), (None,), 4)[0]  # what anndata's h5py write would choose
    names = [f"gene{i}" for i in range(genes)]
    paths = {k: os.path.join(workdir, f"{k}.h5ad") for k in ("plain", "gzip")}
    t0 = time.perf_counter()
    with H5adWriter(paths["plain"], names, sparse=True, chunk_values=chunk) as plain, \
            H5adWriter(paths["gzip"], names, sparse=True, chunk_values=chunk, compression="gzip") as gz:
        step = 2000
        for start in range(0, cells, step):
            n = min(step, cells - start)
            gaps = rng.geometric(nnz / genes, size=(n, int(nnz * 1.3) + 50))
            cols = np.cumsum(gaps, axis=1) - 1
            keep = cols < genes
            indices = cols[keep].astype(np.int32)
            indptr = np.r_[0, np.cumsum(keep.sum(1))]
            data = (1 + rng.poisson(rate[indices])).astype(np.float32)
            m = sp.csr_matrix((data, indices, indptr), shape=(n, genes))
            obs = {"cell_type": types[rng.integers(0, len(types), n)]}
            obs_names = [f"cell{i}" for i in range(start, start + n)]
            plain.append(m, obs, obs_names)
            gz.append(m, obs, obs_names)
    return {"seconds": round(time.perf_counter() - t0, 1), "chunk_values": int(chunk),
            "bytes": {k: os.path.getsize(p) for k, p in paths.items()}}


def warm(path: str) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(64 << 20):
            pass
    return time.perf_counter() - t0


# -- methods (each runs in its own process) --------------------------------------------------------

def _transform(var_names):
    from scidiff.data.streaming import Transform

    rng = np.random.default_rng(1)
    genes = [var_names[i] for i in rng.choice(len(var_names), N_MODEL_GENES, replace=False)]
    return Transform.build(var_names, genes, counts=True, target_sum=1e4, offset=np.full(N_MODEL_GENES, 0.5),
                           scale=np.full(N_MODEL_GENES, 1.5))


def _normalise(m, t) -> np.ndarray:
    """What every method produces: the same numbers as scidiff's in-memory path."""
    from scidiff.data.preprocess import dense, log_normalize

    m, _ = log_normalize(m, t.target_sum)
    return ((dense(m[:, t.gene_cols]) - t.offset) / t.scale).astype(np.float32)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's before exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_anndata_backed(path, seconds):
    import anndata as ad

    a = ad.read_h5ad(path, backed="r")
    t = _transform(list(map(str, a.var_names)))
    rng = np.random.default_rng(0)
    n, done, t0 = a.n_obs, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = np.sort(rng.choice(n, BATCH, replace=False))
        x = _normalise(a.X[idx], t)
        done += x.shape[0]
    return done, time.perf_counter() - t0


def run_h5py_read_direct(path, seconds):
    import h5py
    import scipy.sparse as sp

    from scidiff.data.h5ad_layout import open_matrix

    t = _transform(open_matrix(path).var_names)
    f = h5py.File(path, "r")
    data, indices = f["X/data"], f["X/indices"]
    indptr = f["X/indptr"][...].astype(np.int64)
    n_genes = int(f["X"].attrs["shape"][1])
    rng = np.random.default_rng(0)
    n, done, t0 = len(indptr) - 1, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = int(rng.integers(0, n - BATCH))
        a, b = indptr[s], indptr[s + BATCH]
        d, i = np.empty(b - a, data.dtype), np.empty(b - a, indices.dtype)
        data.read_direct(d, np.s_[a:b])
        indices.read_direct(i, np.s_[a:b])
        x = _normalise(sp.csr_matrix((d, i, indptr[s:s + BATCH + 1] - a), shape=(BATCH, n_genes)), t)
        done += x.shape[0]
    return done, time.perf_counter() - t0


def _run_loader(path, seconds, backend, whole_file):
    from scidiff.data.streaming import MatrixReader, StreamingLoader

    reader = MatrixReader(path, backend=backend)
    t = _transform(reader.var_names)
    loader = StreamingLoader(reader, t, batch_size=BATCH, shuffle=True, seed=0, pin_memory=False)
    done, t0 = 0, time.perf_counter()
    while True:
        for batch in loader:
            done += batch["x"].shape[0]
            if not whole_file and time.perf_counter() - t0 > seconds:
                return done, time.perf_counter() - t0
        if whole_file and time.perf_counter() - t0 > seconds / 4:
            return done, time.perf_counter() - t0


def run_python_path(path, seconds):
    return _run_loader(path, seconds, "python", whole_file=False)


def run_extension(path, seconds):
    return _run_loader(path, seconds, "native", whole_file=True)


METHODS = {"anndata_backed": run_anndata_backed, "h5py_read_direct": run_h5py_read_direct,
           "python_path": run_python_path, "extension": run_extension}


class RssSampler:
    """Samples this process's resident set size every ``every`` seconds."""

    def __init__(self, every: float = 0.25):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while not self._stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        self.samples.append(int(line.split()[1]) / 1024)
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_train(path, steps, limit_gb):
    """Train ``steps`` steps from the streamed file under an address-space limit."""
    if limit_gb:
        lim = int(limit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch

    torch.set_num_threads(1)
    from scidiff.data.block_order import as_runs
    from scidiff.data.stream_setup import setup_streaming
    from scidiff.models import ScIDiffModel
    from scidiff.training import ScIDiffTrainer

    out = {"file_gb": round(os.path.getsize(path) / 1e9, 2), "address_space_limit_gb": limit_gb}
    with RssSampler() as rss:
        t0 = time.perf_counter()
        cells = setup_streaming(path, n_top_genes=N_MODEL_GENES, condition_keys=["cell_type"], hvg_cells=20000)
        out["setup_seconds"] = round(time.perf_counter() - t0, 1)
        out["rss_after_setup_mb"] = round(rss.samples[-1] if rss.samples else 0.0)
        model = ScIDiffModel(gene_dim=cells.spec.n_genes, data_spec=cells.spec, latent_dim=64, hidden_dim=256,
                             num_layers=3)
        model.fit_latent_from_moments(cells.moments["mean"], cells.moments["cov"], cells.moments["n"])
        block = cells.reader.default_block_size()
        rng = np.random.default_rng(0)
        n_blocks = -(-len(cells) // block)
        pick = np.sort(rng.choice(n_blocks, min(n_blocks, -(-steps * BATCH // block)), replace=False))
        subset = cells.subset(as_runs(np.stack([pick * block, np.minimum(pick * block + block, len(cells))], 1)))
        trainer = ScIDiffTrainer(model, subset.loader(BATCH, seed=0, drop_last=True), device="cpu",
                                 warmup_steps=50, early_stopping_patience=None, progress=False)
        t1 = time.perf_counter()
        history = trainer.train(1)
        out.update(steps=trainer.step, train_seconds=round(time.perf_counter() - t1, 1),
                   steps_per_s=round(trainer.step / (time.perf_counter() - t1), 1),
                   train_loss=round(history[-1]["train_loss"], 4))
    out["rss_max_mb"] = round(max(rss.samples))
    out["rss_samples"] = len(rss.samples)
    out["peak_rss_mb"] = round(_peak_rss_mb())
    if limit_gb:  # the same file does not fit in memory under this limit
        import anndata as ad

        try:
            ad.read_h5ad(path)
            out["in_memory_load_under_limit"] = "loaded"
        except BaseException as exc:  # noqa: BLE001 - MemoryError or an h5py allocation error
            out["in_memory_load_under_limit"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    import anndata  # noqa: F401  (imports before the clock starts)
    import scipy.sparse  # noqa: F401

    import scidiff.data.streaming  # noqa: F401
    if args.worker == "train":
        result = run_train(args.file, args.train_steps, args.memory_limit_gb)
    else:
        cpu0 = time.process_time()
        done, secs = METHODS[args.worker](args.file, args.seconds)
        result = {"cells": int(done), "seconds": round(secs, 2), "cells_per_s": round(done / secs),
                  "cpu_us_per_cell": round((time.process_time() - cpu0) / max(done, 1) * 1e6, 1),
                  "peak_rss_mb": round(_peak_rss_mb()), "load_average_after": round(os.getloadavg()[0], 2)}
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name: str, path: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--file", path, "--seconds", str(args.seconds),
           "--train-steps", str(args.train_steps), "--memory-limit-gb", str(args.memory_limit_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT "):])


def summarize(runs: dict) -> dict:
    """Goals of issue 3 from one run's measurements. Wall-clock rates depend on what else the
    machine runs; CPU time per cell does much less, so it is reported next to them, with the
    rate it implies on two otherwise idle cores (a projection, not a measurement)."""
    def get(key, field):
        return runs.get(key, {}).get(field) or float("nan")

    rss = max(runs.get(f"{k}/extension", {}).get("peak_rss_mb", float("nan")) for k in ("plain", "gzip"))
    out = {
        "plain_extension_cells_per_s": get("plain/extension", "cells_per_s"),
        "plain_vs_anndata_backed": round(get("plain/extension", "cells_per_s") / get("plain/anndata_backed", "cells_per_s"), 1),
        "gzip_extension_cells_per_s": get("gzip/extension", "cells_per_s"),
        "gzip_vs_h5py_serial": round(get("gzip/extension", "cells_per_s") / get("gzip/h5py_read_direct", "cells_per_s"), 1),
        "whole_file_peak_rss_mb": rss,
        "cpu_time_ratio_plain_anndata_over_extension": round(
            get("plain/anndata_backed", "cpu_us_per_cell") / get("plain/extension", "cpu_us_per_cell"), 1),
        "cpu_time_ratio_gzip_h5py_over_extension": round(
            get("gzip/h5py_read_direct", "cpu_us_per_cell") / get("gzip/extension", "cpu_us_per_cell"), 1),
        "projected_cells_per_s_2_idle_cores": {k: round(2e6 / get(f"{k}/extension", "cpu_us_per_cell"))
                                               for k in ("plain", "gzip")},
    }
    out["goals_met_wall_clock"] = {
        "plain >= 150k cells/s": out["plain_extension_cells_per_s"] >= 150_000,
        "plain >= 15x anndata backed": out["plain_vs_anndata_backed"] >= 15,
        "gzip >= 40k cells/s": out["gzip_extension_cells_per_s"] >= 40_000,
        "gzip >= 2x h5py serial": out["gzip_vs_h5py_serial"] >= 2,
        "peak RSS < 2 GB": rss < 2048}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2000, help="average nonzeros per cell")
    p.add_argument("--seconds", type=float, default=12.0, help="time budget per method")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--memory-limit-gb", type=float, default=3.0, help="address-space limit of the training run")
    p.add_argument("--workdir", default="/tmp/scidiff-bench-loader")
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the generated files")
    p.add_argument("--out", default=os.path.join(HERE, "results", "loader.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from scidiff.data.streaming import _ext, extension_available

    os.makedirs(args.workdir, exist_ok=True)
    need = args.cells * args.nnz * 8 * 1.7
    free = shutil.disk_usage(args.workdir).free
    if free < need * 1.3:
        sys.exit(f"need about {need / 1e9:.1f} GB free in {args.workdir}, have {free / 1e9:.1f} GB")
    meta_path = os.path.join(args.workdir, "meta.json")
    params = {"cells": args.cells, "genes": args.genes, "nnz": args.nnz}
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    if meta.get("params") != params:
        print(f"generating {args.cells} cells x {args.genes} genes, ~{args.nnz} nonzeros a cell ...", flush=True)
        meta = {"params": params, **generate(args.workdir, args.cells, args.genes, args.nnz)}
        json.dump(meta, open(meta_path, "w"))
    results = {"machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
               "extension_built": extension_available(), "inflate_library": getattr(_ext, "deflate", None),
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
               "file": meta, "batch_size": BATCH, "model_genes": N_MODEL_GENES, "seconds_per_method": args.seconds,
               "runs": {}}
    try:
        for kind in ("plain", "gzip"):
            path = os.path.join(args.workdir, f"{kind}.h5ad")
            results[f"warm_read_seconds_{kind}"] = round(warm(path), 1)
            for name in METHODS:
                r = spawn(name, path, args)
                results["runs"][f"{kind}/{name}"] = r
                print(f"{kind:6s} {name:18s} {r}", flush=True)
        print("training from the streamed file ...", flush=True)
        results["training"] = spawn("train", os.path.join(args.workdir, "plain.h5ad"), args)
        print(f"training {results['training']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    results["summary"] = summarize(results["runs"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, args.out)
    print("\n| file | method | cells/s | CPU us/cell | peak RSS (MB) |\n|---|---|---|---|---|")
    for key, r in results["runs"].items():
        kind, name = key.split("/")
        print(f"| {kind} | {name} | {r.get('cells_per_s', 'error')} | {r.get('cpu_us_per_cell', '')} | "
              f"{r.get('peak_rss_mb', '')} |")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
