"""Cells without a condition, from a model trained on covariates: the model's condition-free
distribution (``model.sample(n)`` with no condition: classifier-free guidance's null condition,
learnt from the training steps that dropped every covariate) against the training groups in
their proportions (``scidiff.generate(model, n)`` and ``scidiff sample`` without ``--condition``:
:func:`scidiff.tasks.generate.plan_groups`), and a partial condition (``condition=stimulated``:
the cell type from the null condition, as ``model.sample`` leaves it) against the mixture of that
condition's groups (the default since this measurement).

Kang (cell_type x condition, 14 groups), 20% of each group held out, the model trained exactly
as ``scidiff train --condition-keys cell_type,condition`` does (the packaged config). Scored
against the pooled held-out cells in 30 PCs of the training cells: RBF-MMD, energy distance and
the random-forest AUC (3 subsample draws), per sampling seed; measured cells (the default
output). Both arms are generated, so neither has the in-sample advantage of the real training
cells (which score AUC ~0.6 against the held-out cells here: with 1,579 cells the PCA fits their
noise), and the difference between arms is the measurement.

    python bench/bench_unconditional.py [--seeds 5] [--cells 2000] [--out bench/results/unconditional_kang.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")
KEYS = ["cell_type", "condition"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--seeds", type=int, default=5, help="sampling seeds (one trained model)")
    p.add_argument("--cells", type=int, default=2000, help="cells generated per arm and seed")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--model", default=None, help="a run folder trained on this split to reuse (else trained here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "unconditional_kang.json"))
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        sys.exit(f"missing {args.data}: this benchmark needs ../shared/data beside the project")
    torch.set_num_threads(args.threads)

    import scidiff
    from bench_generation import held_out_split
    from machine_info import machine, write_json
    from scidiff.config import load_config
    from scidiff.evaluation import fit_pca
    from scidiff.evaluation.metrics import distribution_metrics
    from scidiff.tasks.train import train
    from scidiff.training import load_model

    adata = scidiff.data.read_h5ad(args.data)
    _, train_mask, test_mask = held_out_split(adata, KEYS, 0)
    t0 = time.perf_counter()
    if args.model:
        model = load_model(args.model)
    else:
        with tempfile.TemporaryDirectory() as run:
            model = train(adata[train_mask].copy(), run, load_config(overrides={"training": {"seed": 0}}),
                          condition_keys=KEYS, progress=False)
    train_s = time.perf_counter() - t0
    real = scidiff.transform_like(model.data_spec, adata).log_expression()
    project = fit_pca(real[train_mask], 30, 0)
    pcs = project(real)
    stimulated = adata.obs["condition"].astype(str).to_numpy() == "stimulated"

    def mixture(n, seed, condition=None):  # what scidiff.generate and scidiff sample draw
        return scidiff.generate(model, n, condition, steps=args.steps, seed=seed, progress=False).X

    def score(cells, test):
        m = distribution_metrics(pcs[test], project(cells), seed=0, auc_repeats=3)
        return {k: float(m[k]) for k in ("mmd", "energy_distance", "classifier_auc")}

    arms = {
        "no condition: condition-free (model.sample)": (
            lambda s: model.sample(args.cells, {}, steps=args.steps, seed=s).numpy(), test_mask),
        "no condition: training groups in proportion (default)": (lambda s: mixture(args.cells, s), test_mask),
        "condition=stimulated: cell type from the null condition (model.sample)": (
            lambda s: model.sample(args.cells, {"condition": "stimulated"}, steps=args.steps, seed=s).numpy(),
            test_mask & stimulated),
        "condition=stimulated: its groups in proportion (default)": (
            lambda s: mixture(args.cells, s, {"condition": "stimulated"}), test_mask & stimulated),
    }
    rows = {}
    for name, (draw, test) in arms.items():
        per_seed = [score(draw(1000 * s), test) for s in range(args.seeds)]
        rows[name] = {k: {"mean": float(np.mean([r[k] for r in per_seed])), "sd": float(np.std([r[k] for r in per_seed])),
                          "per_seed": [r[k] for r in per_seed]} for k in per_seed[0]}
        print(f"{name:58s} " + "  ".join(f"{k} {v['mean']:.4f} ({v['sd']:.4f})" for k, v in rows[name].items()),
              flush=True)
    write_json(args.out, {"arms": rows, "setup": {
        "data": os.path.basename(args.data), "condition_keys": KEYS, "held_out": 0.2, "test_cells": int(test_mask.sum()),
        "train_cells": int(train_mask.sum()), "cells_per_arm": args.cells, "seeds": args.seeds,
        "sampler_steps": args.steps, "observed": True, "auc_repeats": 3, "train_seconds": round(train_s, 1),
        "model": "reused" if args.model else "trained here (packaged config, seed 0)", "threads": args.threads,
        "machine": machine(torch=torch.__version__)}})


if __name__ == "__main__":
    main()
