"""Predicting a whole screen: ``predict_screen`` (one model load, the control cells inverted once
and shared by every target) against one ``perturb`` call per target (each inverting the cells
again), on Papalexi et al. 2021's THP-1 knockouts (cells with ``grna_frac_top >= 0.8``): a model
trained for a few epochs (timing only; the predictions of both ways are checked equal), then every
knockout predicted from the same control cells.

    python bench/bench_screen_predict.py [--controls 500] [--epochs 5] [--steps 50]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "papalexi21_thp1_sceptre_lowmoi.h5ad")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--controls", type=int, default=500, help="control cells every target starts from")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "screen_predict.json"))
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        sys.exit(f"{args.data} not found: this benchmark needs ../shared/data")
    torch.set_num_threads(args.threads)
    import anndata as ad

    import machine_info
    import scidiff
    from scidiff.tasks.perturb import perturb
    from scidiff.tasks.screen import predict_screen

    a = ad.read_h5ad(args.data)
    a = a[a.obs["grna_frac_top"].to_numpy() >= 0.8].copy()
    del a.obsm["grna_counts"]
    cells = scidiff.setup_anndata(a, n_top_genes=None, condition_keys=["bio_rep"], perturbation_keys=["perturbation"],
                                  control_labels=["control"])
    torch.manual_seed(0)
    model = scidiff.ScIDiffModel.from_data(cells, hidden_dim=256, num_layers=4, latent_dim=64)
    t = time.perf_counter()
    scidiff.ScIDiffTrainer(model, cells.loader(256, seed=0), device="cpu", early_stopping_patience=None, seed=0,
                           progress=False).train(args.epochs)
    train_s = time.perf_counter() - t
    controls = a[a.obs["perturbation"].astype(str) == "control"]
    controls = controls[np.random.default_rng(0).choice(controls.n_obs, args.controls, replace=False)].copy()
    targets = [{"perturbation": k} for k in sorted(set(a.obs["perturbation"].astype(str)) - {"control"})]

    t = time.perf_counter()
    screen = predict_screen(model, controls, targets, steps=args.steps, progress=False)
    screen_s = time.perf_counter() - t
    t = time.perf_counter()
    apart = [perturb(model, controls, target, steps=args.steps, progress=False) for target in targets]
    apart_s = time.perf_counter() - t
    same = bool(np.array_equal(screen.X, np.vstack([p.X for p in apart])))
    t = time.perf_counter()  # the shifted output (observed=False): what measuring the predicted cells costs
    predict_screen(model, controls, targets, steps=args.steps, progress=False, observed=False)
    shifted_s = time.perf_counter() - t
    n_pred = len(targets) * controls.n_obs
    result = {"targets": len(targets), "control_cells": controls.n_obs, "steps": args.steps, "epochs": args.epochs,
              "train_seconds": train_s, "predict_screen_seconds": screen_s, "one_call_per_target_seconds": apart_s,
              "speedup": apart_s / screen_s, "predicted_cells_per_second": n_pred / screen_s,
              "shifted_predict_screen_seconds": shifted_s, "measured_over_shifted_time": screen_s / shifted_s,
              "same_predictions": same,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__}}
    print(f"{len(targets)} targets x {controls.n_obs} control cells, {args.steps} DDIM steps: predict_screen "
          f"{screen_s:.1f} s, one perturb call per target {apart_s:.1f} s ({apart_s / screen_s:.2f}x); "
          f"same predictions: {same}; shifted cells (observed=False) {shifted_s:.1f} s", flush=True)
    machine_info.write_json(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
