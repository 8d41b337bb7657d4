"""Denoising real raw counts, scored by molecular cross-validation (Batson et al. 2019).

Per data set: binomial thinning at p = 0.5 (seed 0) splits the counts into halves A and B; the
model is trained on half A, denoises half A, and is scored against half B (Poisson loss and MSE
in log1p-normalised space, scidiff.evaluation.denoising). Baselines scored by the same code:
raw A, PCA reconstruction with the number of components chosen by the same cross-validation,
and kNN smoothing. The denoising strength is chosen by the same cross-validation (as PCA's k is).
Marker structure: silhouette of the cell types in 30 PCs, denoised vs raw (where labels exist).

    python bench/bench_denoise.py [--epochs 300] [--out bench/results/denoise.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")
DATASETS = {"pbmc10k_protein_200cells": ("pbmc10k_protein_200cells.h5ad", None, None),
            "kang_ifnb_pbmc": ("kang_ifnb_pbmc.h5ad", "counts", "cell_type")}


def silhouette(counts, labels, seed=0):
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    from scidiff.evaluation.denoising import _log_norm

    x = _log_norm(np.maximum(np.asarray(counts, float), 0))
    pcs = PCA(30, random_state=seed).fit_transform(x)
    return float(silhouette_score(pcs, labels))


def run_dataset(name, args):
    import anndata as ad

    import scidiff
    from scidiff.tasks.denoise import binomial_split, denoise
    from scidiff.evaluation.denoising import (best_pca_denoiser, counts_from_log, knn_denoiser, mcv_scores,
                                              raw_denoiser)

    fname, layer, label_key = DATASETS[name]
    path = os.path.join(args.data_dir, fname)
    full = ad.read_h5ad(path)
    counts = full.layers[layer] if layer else full.X
    a, b = binomial_split(counts, 0.5, args.seed)
    half_a = ad.AnnData(X=a.astype(np.float32), obs=full.obs.copy())
    half_a.var_names = full.var_names
    lib_a = np.asarray(a.sum(1)).ravel()
    out = {"cells": int(full.n_obs), "genes": int(full.n_vars), "methods": {}}
    out["methods"]["raw"] = mcv_scores(raw_denoiser(a), a, b)
    k, pca_counts, pca_grid = best_pca_denoiser(a, b, seed=args.seed)
    out["methods"]["pca"] = {**pca_grid[k], "n_components": k}
    out["pca_grid_mse"] = {str(kk): v["mse"] for kk, v in pca_grid.items()}
    knn_counts = knn_denoiser(a, 15, seed=args.seed)
    out["methods"]["knn"] = mcv_scores(knn_counts, a, b)

    keys = [label_key] if label_key else []
    data = scidiff.setup_anndata(half_a, n_top_genes=None, condition_keys=keys)
    sweep, models, out["train_seconds"] = {}, {}, {}
    for latent in args.latent_dims:  # the latent width is chosen by the same cross-validation as PCA's k
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = scidiff.ScIDiffModel.from_data(data, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                                               latent_dim=latent)
        scidiff.ScIDiffTrainer(model, data.loader(args.batch_size, seed=args.seed), device="cpu",
                               early_stopping_patience=None, seed=args.seed, progress=False).train(args.epochs)
        out["train_seconds"][latent] = round(time.perf_counter() - t0, 1)
        models[latent] = model
        for method, settings in (("sdedit", [{"strength": s} for s in args.strengths]),
                                 ("posterior", [{"strength": s, "likelihood_weight": w}
                                                for s in args.strengths for w in args.weights])):
            for kw in settings:
                den = denoise(model, half_a, method=method, n_samples=args.n_samples, seed=args.seed,
                              progress=False, **kw)
                d = counts_from_log(den.layers["scidiff_denoised"].astype(np.float64), lib_a)
                label = f"latent={latent} {method} " + " ".join(f"{k}={v}" for k, v in kw.items())
                sweep[label] = {**mcv_scores(d, a, b), **kw, "method": method, "latent_dim": latent}
                print(f"  {name} {label}: {sweep[label]['poisson_loss']:.4f} / {sweep[label]['mse']:.4f}",
                      flush=True)
    out["scidiff_sweep"] = sweep
    summarize(out)
    if label_key:
        labels = full.obs[label_key].astype(str).to_numpy()
        best = out["methods"]["scidiff"]
        best_kw = {k: v for k, v in best.items() if k in ("strength", "likelihood_weight")}
        den = denoise(models[best["latent_dim"]], half_a, method=best["method"],
                      n_samples=args.n_samples, seed=args.seed, progress=False, **best_kw)
        out["silhouette"] = {"raw": silhouette(_dense(a), labels),
                             "scidiff": silhouette(counts_from_log(den.layers["scidiff_denoised"].astype(float), lib_a), labels),
                             "pca": silhouette(pca_counts, labels)}
    return out


def summarize(out: dict) -> None:
    """Pick scidiff's setting by cross-validated Poisson loss (the MCV loss of Batson et al.; the
    setting with the best MSE is recorded too) and compare both losses with the best baseline."""
    sweep = out["scidiff_sweep"]
    by = {m: min(sweep, key=lambda s: sweep[s][m]) for m in ("poisson_loss", "mse")}
    out["methods"]["scidiff"] = {**sweep[by["poisson_loss"]], "setting": by["poisson_loss"]}
    out["scidiff_best_mse_setting"] = {**sweep[by["mse"]], "setting": by["mse"]}
    base_best = {m: min(out["methods"][b][m] for b in ("raw", "pca", "knn")) for m in ("poisson_loss", "mse")}
    out["improvement_over_best_baseline"] = {
        "poisson_loss (setting chosen by poisson loss)": 1 - sweep[by["poisson_loss"]]["poisson_loss"] / base_best["poisson_loss"],
        "mse (setting chosen by mse)": 1 - sweep[by["mse"]]["mse"] / base_best["mse"]}


def _dense(m):
    return m.toarray() if hasattr(m, "toarray") else np.asarray(m)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=SHARED)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--latent-dims", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16])
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--strengths", type=lambda s: [float(v) for v in s.split(",")], default=[0.2, 0.4, 0.6])
    p.add_argument("--weights", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 1.0])
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "denoise.json"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        sys.exit(f"missing {args.data_dir}: this benchmark needs ../shared/data beside the project")
    torch.set_num_threads(args.threads)
    results = {"datasets": {}, "setup": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}}
    for name in args.datasets.split(","):
        results["datasets"][name] = run_dataset(name, args)
        r = results["datasets"][name]
        print(name, {m: {k: round(v, 4) for k, v in s.items() if k in ("poisson_loss", "mse")}
                     for m, s in r["methods"].items()}, "improvement", r["improvement_over_best_baseline"], flush=True)
    results["setup"].update({"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
