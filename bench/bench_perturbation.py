"""Perturbation prediction on Kang et al. 2018 IFN-beta PBMCs, leave one cell type out.

For each of the 7 cell types: train without its stimulated cells, predict them from its control
cells, and score the prediction against the real stimulated cells with every metric of
scidiff.evaluation.perturbation; the baselines (no change, mean shift, a linear model on the
perturbation embedding) are scored by the same code. DEGs: scanpy Wilcoxon, real stimulated vs
control cells of the held-out type. Distances in 30 PCs fitted on the fold's training cells.
Intervals: bootstrap over cells (per fold) and over the folds' bootstrap means (the average).
Folds, DEG lists and seeds are written out with the results. Each finished fold is also kept in
``OUT.folds/`` so that an interrupted run resumes where it stopped.

    python bench/bench_perturbation.py [--epochs 400] [--out bench/results/perturbation_kang.json]
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
DATA = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")
METRICS = ("scgen_r2_all", "scgen_r2_top100", "r2_top50", "pearson_delta_all", "pearson_delta_top20",
           "mse_top20", "e_distance", "mmd")


def bootstrap(pred, true, control, genes, degs, project, seed, n_boot):
    from scidiff.evaluation.perturbation import perturbation_metrics

    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        p = pred[rng.integers(0, len(pred), len(pred))]
        t = true[rng.integers(0, len(true), len(true))]
        c = control[rng.integers(0, len(control), len(control))]
        reps.append(perturbation_metrics(p, t, c, genes, degs, project))
    return {k: np.array([r[k] for r in reps]) for k in METRICS}


def fold_settings(args) -> dict:
    """What a fold's result depends on: a cached fold is reused only under the same settings."""
    return {k: getattr(args, k) for k in ("data", "epochs", "latent_dim", "hidden_dim", "num_layers", "steps",
                                          "n_boot", "seed")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folds", default=None, help="comma-separated cell types (default: all 7)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "perturbation_kang.json"))
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        sys.exit(f"missing {args.data}: this benchmark needs ../shared/data beside the project")
    torch.set_num_threads(args.threads)

    import scidiff
    from scidiff.evaluation import fit_pca
    from scidiff.evaluation.perturbation import (LinearPerturbationModel, mean_shift, no_change,
                                                 perturbation_metrics, rank_degs)
    from scidiff.perturbation import predict_perturbation

    adata = scidiff.data.read_h5ad(args.data)
    genes = [str(g) for g in adata.var_names]
    x_all = adata.X.toarray().astype(np.float32)
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    stim = (adata.obs["condition"].astype(str) == "stimulated").to_numpy()
    types = args.folds.split(",") if args.folds else sorted(set(ct))
    results = {"folds": {}, "setup": {}}
    per_method_boot = {}
    t_total = time.perf_counter()
    fold_dir = args.out + ".folds"
    os.makedirs(fold_dir, exist_ok=True)
    for held in types:
        fi = sorted(set(ct)).index(held)  # the bootstrap seed follows the fold, not the run's fold list
        cache = os.path.join(fold_dir, f"{held}.npz")
        if os.path.exists(cache):  # a fold finished by an earlier, interrupted run of the same settings
            with np.load(cache, allow_pickle=False) as z:
                saved = json.loads(str(z["fold"]))
                if saved["settings"] == fold_settings(args):
                    results["folds"][held] = saved["fold"]
                    for name in saved["fold"]["methods"]:
                        per_method_boot.setdefault(name, []).append({k: z[f"{name}/{k}"] for k in METRICS})
                    print(f"{held:12s} loaded from {cache}", flush=True)
                    continue
        t0 = time.perf_counter()
        train_mask = ~((ct == held) & stim)
        torch.manual_seed(args.seed)
        data = scidiff.setup_anndata(adata[train_mask].copy(), n_top_genes=None, condition_keys=["cell_type"],
                                     perturbation_keys=["condition"])
        model = scidiff.ScIDiffModel.from_data(data, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                                               latent_dim=args.latent_dim or None)
        scidiff.ScIDiffTrainer(model, data.loader(256, seed=args.seed), device="cpu", early_stopping_patience=None,
                               seed=args.seed, progress=False).train(args.epochs)
        train_s = time.perf_counter() - t0
        control_mask, true_mask = (ct == held) & ~stim, (ct == held) & stim
        control, true = x_all[control_mask], x_all[true_mask]
        preds = {}
        for method in ("counterfactual", "population"):
            preds[f"scidiff_{method}"] = predict_perturbation(
                model, adata[control_mask].copy(), {"condition": "stimulated"}, method=method, steps=args.steps,
                seed=args.seed, progress=False).X
        others = [t for t in sorted(set(ct)) if t != held]
        deltas = [x_all[(ct == t) & stim].mean(0) - x_all[(ct == t) & ~stim].mean(0) for t in others]
        preds["no_change"] = no_change(control)
        preds["mean_shift"] = mean_shift(control, deltas)
        # linear model on the perturbation embedding: [stimulated] -> delta, fitted on the other types
        lin = LinearPerturbationModel(alpha=1.0).fit(np.ones((len(others), 1)), np.stack(deltas))
        preds["linear"] = lin.predict(control, np.ones(1))
        degs = rank_degs(true, control, genes, 100)
        project = fit_pca(x_all[train_mask], 30, args.seed)
        fold = {"n_control": int(control_mask.sum()), "n_stimulated": int(true_mask.sum()), "degs_top100": degs,
                "train_seconds": round(train_s, 1), "methods": {}}
        for name, pred in preds.items():
            m = perturbation_metrics(pred, true, control, genes, degs, project)
            boots = bootstrap(pred, true, control, genes, degs, project, args.seed + fi, args.n_boot)
            m["interval95"] = {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
                               for k, v in boots.items()}
            fold["methods"][name] = m
            per_method_boot.setdefault(name, []).append(boots)
        results["folds"][held] = fold
        arrays = {f"{name}/{k}": per_method_boot[name][-1][k] for name in preds for k in METRICS}
        tmp = cache + ".tmp.npz"
        np.savez(tmp, fold=json.dumps({"settings": fold_settings(args), "fold": fold}), **arrays)
        os.replace(tmp, cache)
        print(f"{held:12s} " + "  ".join(f"{n}: pd {fold['methods'][n]['pearson_delta_all']:.3f} "
                                         f"r2top100 {fold['methods'][n]['scgen_r2_top100']:.3f} "
                                         f"E {fold['methods'][n]['e_distance']:.2f}"
                                         for n in ("scidiff_counterfactual", "mean_shift")), flush=True)
    summary = {}
    for name in per_method_boot:
        summary[name] = {}
        for k in METRICS:
            vals = np.array([results["folds"][h]["methods"][name][k] for h in types])
            boot_mean = np.nanmean(np.stack([b[k] for b in per_method_boot[name]]), axis=0)
            summary[name][k] = {"mean": float(np.nanmean(vals)), "ci95": [float(np.nanpercentile(boot_mean, 2.5)),
                                                                          float(np.nanpercentile(boot_mean, 97.5))]}
    best = summary["scidiff_counterfactual"]
    results["summary"] = summary
    results["goal"] = {"pearson_delta_all>=0.88": best["pearson_delta_all"]["mean"] >= 0.88,
                       "scgen_r2_top100>=0.92": best["scgen_r2_top100"]["mean"] >= 0.92,
                       "e_distance<mean_shift": best["e_distance"]["mean"] < summary["mean_shift"]["e_distance"]["mean"]}
    results["setup"] = {"data": os.path.basename(args.data), "genes": len(genes), "folds": types,
                        "epochs": args.epochs, "latent_dim": args.latent_dim, "hidden_dim": args.hidden_dim,
                        "num_layers": args.num_layers, "ddim_steps": args.steps, "seed": args.seed,
                        "n_boot": args.n_boot, "seconds": round(time.perf_counter() - t_total, 1),
                        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, args.out)
    for name, m in summary.items():
        print(f"{name:24s} " + "  ".join(f"{k} {m[k]['mean']:.3f}" for k in METRICS))
    print("goal:", results["goal"])


if __name__ == "__main__":
    main()
