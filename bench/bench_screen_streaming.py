"""A CRISPR screen set up for training from memory and from the file on disk (``--streaming``):
time and peak memory before the first training step, each in a fresh process, on the same
``.h5ad``.

The screen is synthetic, the size of a genome-scale Perturb-seq subset (default 100,000 cells,
5,000 genes of raw counts, 1,000 knockouts of its own genes, 10% non-targeting controls, 3 gem
groups; each knockout lowers its gene, a third of them 30 more). Both modes run what ``scidiff
train --condition-keys gene,gem_group --perturbation-keys gene --control-labels non-targeting``
runs before training, with 2,000 highly variable genes: in memory ``read_h5ad``,
``setup_anndata``, ``ScIDiffModel.from_data`` and the perturbation prior; streamed
``setup_streaming``, ``ScIDiffModel.from_streamed`` and the prior from the file
(:mod:`scidiff.data.stream_setup`). The streamed set-up chooses its genes on 20,000 cells (the
in-memory one on all), so the two fits are on slightly different genes; the JSON records how many
genes they share.

    python bench/bench_screen_streaming.py [--cells 100000] [--genes 5000] [--perturbations 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def write_screen(path: str, n_cells: int, n_genes: int, n_perturbations: int, seed: int = 0) -> None:
    """The synthetic screen (module docstring) as a CSR ``.h5ad`` of counts."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i}" for i in range(n_genes)])
    targets = rng.choice(n_genes, n_perturbations, replace=False)
    labels = np.r_[["non-targeting"], genes[targets]]
    label = rng.choice(len(labels), n_cells, p=np.r_[0.1, np.full(n_perturbations, 0.9 / n_perturbations)])
    effect = np.zeros((len(labels), n_genes), np.float32)
    for k in range(1, len(labels)):
        effect[k, targets[k - 1]] = -2.0
        if k % 3 == 0:
            effect[k, rng.choice(n_genes, 30, replace=False)] += rng.normal(0, 0.5, 30)
    base = np.exp(rng.normal(-1.5, 1.5, n_genes)).astype(np.float32)
    gem = rng.integers(0, 3, n_cells)
    depth = rng.lognormal(0, 0.3, n_cells).astype(np.float32)
    parts = []
    for s in range(0, n_cells, 10_000):
        part = slice(s, s + 10_000)
        mu = base * np.exp(effect[label[part]]) * depth[part, None] * (1 + 0.2 * gem[part, None])
        parts.append(sp.csr_matrix(rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)))
    obs = pd.DataFrame({"gene": labels[label], "gem_group": [f"gem{g}" for g in gem]},
                       index=[f"c{i}" for i in range(n_cells)])
    ad.AnnData(X=sp.vstack(parts).tocsr(), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from scidiff.config import load_config
from scidiff.data import read_h5ad, setup_anndata
from scidiff.models import ScIDiffModel
from scidiff.tasks.train import _streamed_model, fit_perturbation_prior

import machine_info

config = load_config(None, {{"model": {{"gene_dim": {n_genes}}},
                            "data": {{"perturbation_keys": ["gene"], "control_labels": ["non-targeting"]}}}})
keys = ["gene", "gem_group"]
machine_info.reset_peak_memory()
t = time.perf_counter()
if {streaming!r}:
    cells, model = _streamed_model({path!r}, config, keys, progress=False)
    adata = None
else:
    adata = read_h5ad({path!r})
    dc = config.data
    cells = setup_anndata(adata, n_top_genes=config.model.gene_dim, condition_keys=keys, **dc.covariate_kwargs())
    model = ScIDiffModel.from_data(cells, **config.model.model_kwargs())
prior = fit_perturbation_prior(model, cells, adata, config, verbose=False)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "peak_rss_gb": machine_info.peak_rss_gb(), "genes": list(cells.spec.gene_names),
                   "singles_seen": model.effects_report["gene"]["singles_seen"],
                   "prior_fitted": bool(prior and prior.get("fitted")), "latent_dim": model.latent_dim}}))
"""


def set_up(path: str, n_genes: int, streaming: bool) -> dict:
    code = CHILD.format(root=os.path.join(HERE, ".."), bench=HERE, n_genes=n_genes, streaming=streaming, path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=5_000)
    p.add_argument("--perturbations", type=int, default=1_000)
    p.add_argument("--n-genes", type=int, default=2_000, help="highly variable genes the model keeps")
    p.add_argument("--file", default=None, help="where to write the screen (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "screen_streaming.json"))
    args = p.parse_args(argv)

    import torch

    import machine_info
    import scidiff

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or os.path.join(tmp, "screen.h5ad")
        if not os.path.exists(path):
            write_screen(path, args.cells, args.genes, args.perturbations)
        size = os.path.getsize(path)
        runs = {}
        for mode, streaming in (("in_memory", False), ("streamed", True)):
            runs[mode] = set_up(path, args.n_genes, streaming)
            run = runs[mode]
            print(f"{mode}: set-up {run['seconds']:.1f} s, peak RSS {run['peak_rss_gb']:.2f} GB", flush=True)
    shared = len(set(runs["in_memory"].pop("genes")) & set(runs["streamed"].pop("genes")))
    result = {"args": vars(args), "file_bytes": size, "runs": runs, "genes_shared": shared,
              "time_ratio": runs["in_memory"]["seconds"] / runs["streamed"]["seconds"],
              "memory_ratio": runs["in_memory"]["peak_rss_gb"] / runs["streamed"]["peak_rss_gb"],
              "machine": machine_info.machine(scidiff=scidiff.__version__, torch=torch.__version__)}
    print(f"in memory / streamed: time {result['time_ratio']:.2f}x, peak memory {result['memory_ratio']:.2f}x; "
          f"genes shared {shared} of {args.n_genes}")

    machine_info.write_json(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
