"""What a large CRISPR screen costs before training: the closed-form perturbation set-up
(``ScIDiffModel.from_data``: group changes, their empirical-Bayes shrinkage, principal axes) on
a synthetic screen the size of a genome-scale Perturb-seq subset (default 100,000 cells, 2,000
genes, 1,000 knockouts, 3 gem groups), each step beside its direct form on the same input in the
same run:

- distinct (context, perturbation) groups: ``scidiff.data.rows.unique_rows`` vs ``np.unique(axis=0)``;
- group sums and sums of squares: sparse indicator products in float64 chunks vs ``np.add.at``
  on a float64 copy;
- adaptive shrinkage of the pooled and per-group changes: the rows' EM side by side vs ashr's
  per-row loop (``adaptive_shrinkage_per_row``), on the first ``--ash-rows`` rows;
- principal axes: the covariance's eigenvectors vs the SVD of the centred cells.

Then the whole ``ScIDiffModel.from_data`` in a child process, with its peak resident memory.

    python bench/bench_screen_setup.py [--cells 100000] [--genes 2000] [--perturbations 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def screen(n_cells: int, n_genes: int, n_perturbations: int, seed: int = 0):
    """Model-space cells ``x [N, G]`` (float32), the knockouts' multi-hot ``[N, P]`` (10% controls)
    and the gem group ``[N, 1]``: log-scale Poisson-gamma counts, each knockout lowering its own
    gene, a third of them 30 more genes."""
    rng = np.random.default_rng(seed)
    label = rng.choice(n_perturbations + 1, n_cells, p=np.r_[0.1, np.full(n_perturbations, 0.9 / n_perturbations)])
    effect = np.zeros((n_perturbations + 1, n_genes), np.float32)
    for k in range(1, n_perturbations + 1):
        effect[k, rng.integers(n_genes)] = -2.0
        if k % 3 == 0:
            effect[k, rng.choice(n_genes, 30, replace=False)] += rng.normal(0, 0.5, 30)
    base = np.exp(rng.normal(-0.5, 1.0, n_genes)).astype(np.float32)
    gem = rng.integers(0, 3, (n_cells, 1))
    x = np.empty((n_cells, n_genes), np.float32)
    for s in range(0, n_cells, 10_000):
        mu = base * np.exp(effect[label[s:s + 10_000]]) * (1 + 0.2 * gem[s:s + 10_000])
        x[s:s + 10_000] = np.log1p(rng.poisson(rng.gamma(5.0, mu / 5.0)))
    rows = np.zeros((n_cells, n_perturbations), np.float32)
    hit = label > 0
    rows[np.flatnonzero(hit), label[hit] - 1] = 1.0
    return x, rows, gem


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def from_data_child(args) -> dict:
    """``ScIDiffModel.from_data`` on the screen, timed with its peak memory, in a fresh process."""
    code = f"""
import json, sys, time, numpy as np, torch
sys.path.insert(0, {os.path.join(HERE, '..')!r}); sys.path.insert(0, {HERE!r})
from bench_screen_setup import screen
from scidiff.data.dataset import CellData
from scidiff.data.spec import DataSpec
from scidiff.models import ScIDiffModel
x, rows, gem = screen({args.cells}, {args.genes}, {args.perturbations}, {args.seed})
vocab = [f"p{{i}}" for i in range({args.perturbations})]
spec = DataSpec(gene_names=[f"g{{i}}" for i in range({args.genes})], input_kind="log1p",
                categorical={{"gene": vocab, "gem": ["a", "b", "c"]}}, perturbation_keys=["gene"],
                control_labels=["control"])
cov = {{"gene": torch.from_numpy(np.hstack([rows, np.zeros((len(rows), 1), np.float32)])),
        "gem": torch.from_numpy(gem[:, 0])}}
cells = CellData(torch.from_numpy(x), cov, spec, None)
import machine_info
before = machine_info.rss_gb()
machine_info.reset_peak_memory()
t = time.perf_counter()
ScIDiffModel.from_data(cells, latent_dim=64, hidden_dim=64, num_layers=2)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_gb": machine_info.peak_rss_gb(),
                   "rss_before_gb": before}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--perturbations", type=int, default=1_000)
    p.add_argument("--ash-rows", type=int, default=600, help="rows of the shrinkage timed in both forms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "screen_setup.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import machine_info
    from scidiff.data.rows import unique_rows
    from scidiff.models.diffusion_model import principal_axes_from_covariance
    from scidiff.models.effects import _group_moments, _pooling_weights, group_changes
    from scidiff.models.shrinkage import adaptive_shrinkage, adaptive_shrinkage_per_row

    x, rows, gem = screen(args.cells, args.genes, args.perturbations, args.seed)
    steps = {}

    def step(name, fast, direct, check):
        steps[name] = {"scidiff_s": fast, "direct_s": direct, "speedup": direct / fast, "same": check}
        print(f"{name:22s} scidiff {fast:8.2f} s   direct {direct:8.2f} s   {direct / fast:6.1f}x   same: {check}",
              flush=True)

    ((g_ctx, g_rows), index, _), t_fast = timed(unique_rows, gem, rows)
    (want, want_index), t_direct = timed(lambda: np.unique(np.hstack([gem.astype(np.float64), rows]), axis=0,
                                                          return_inverse=True))
    step("groups", t_fast, t_direct, bool(np.array_equal(np.hstack([g_ctx, g_rows]), want)
                                          and np.array_equal(index, want_index.reshape(-1))))

    (sums, squares), t_fast = timed(_group_moments, x, index, len(g_rows))

    def add_at():
        xd = x.astype(np.float64)
        s, q = np.zeros((len(g_rows), x.shape[1])), np.zeros((len(g_rows), x.shape[1]))
        np.add.at(s, index, xd)
        np.add.at(q, index, xd**2)
        return s, q
    (s_ref, q_ref), t_direct = timed(add_at)
    step("group moments", t_fast, t_direct, bool(np.allclose(sums, s_ref, rtol=1e-12) and np.allclose(squares, q_ref, rtol=1e-12)))

    _, design, changes, counts, se2 = group_changes(x, rows, gem)
    pool = _pooling_weights(design, counts)
    coef = design[: args.ash_rows] @ pool
    coef[np.abs(coef) < 1e-12] = 0.0
    own = np.zeros_like(coef)
    own[np.arange(len(coef)), np.arange(len(coef))] = 1.0
    d = np.vstack([coef @ changes, (own - coef) @ changes])
    v = np.vstack([coef**2 @ se2, (own - coef) ** 2 @ se2])
    post, t_fast = timed(adaptive_shrinkage, d, v)
    ref, t_direct = timed(adaptive_shrinkage_per_row, d, v)
    step(f"shrinkage ({len(d)} rows)", t_fast, t_direct, bool(np.allclose(post, ref, rtol=1e-9, atol=1e-12)))

    xt = torch.from_numpy(x)
    (mean, axes, scale), t_fast = timed(principal_axes_from_covariance, xt, 64)

    def svd():
        xd = xt.double()
        m = xd.mean(0)
        return torch.linalg.svd(xd - m, full_matrices=False)[2][:64]
    vt, t_direct = timed(svd)
    same = bool(torch.allclose((axes * torch.sign((axes * vt).sum(1, keepdim=True))), vt, atol=1e-6))
    step("principal axes", t_fast, t_direct, same)

    whole = from_data_child(args)
    print(f"ScIDiffModel.from_data: {whole['seconds']:.1f} s, peak RSS {whole['peak_rss_gb']:.2f} GB "
          f"(the cells and their codes before it: {whole['rss_before_gb']:.2f} GB)", flush=True)
    result = {"args": vars(args), "groups": int(len(g_rows)), "steps": steps, "from_data": whole,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__}}
    machine_info.write_json(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
