"""``scidiff demo``: train on real PBMCs bundled with scanpy, generate every cell type (measured
cells, as ``scidiff sample`` writes them; ``--smooth``: smooth expression), evaluate against the
real cells and a Gaussian baseline, and write a report.

Data: ``scanpy.datasets.pbmc68k_reduced()`` (700 PBMCs from 10x's 68k data set, shipped inside
the scanpy wheel); its ``.raw`` holds log-normalised expression of 765 genes; conditioned on
``bulk_labels`` (10 cell types).
"""
from __future__ import annotations

import json
import os
import time

import anndata as ad
import numpy as np

from ..checks import yes_no
from ..config import load_config
from ..data.io import atomic_path, write_h5ad
from ..evaluation import evaluate_generation_quality
from ..evaluation.baselines import gaussian_pca_generator
from ..evaluation.plots import report_plots
from ..models.diffusion_model import OBSERVED
from ..training import seed_everything
from .evaluate import log_expression_of
from .generate import generate
from .train import train


def _table(rows: dict, cols) -> str:
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |\n" for name, r in rows.items())


def _kind(observed: bool) -> str:
    """What the report says the generated cells are."""
    if observed:
        return "measured (sparse, through the model's detection model; `--smooth`: each cell's smooth expression)"
    return "as each cell's smooth expression (`--smooth`; measured cells without it)"


def run_demo(out_dir: str = "demo_out", epochs: int = 400, seed: int = 0, progress: bool = True,
             observed: bool | None = None) -> dict:
    """Train, generate and evaluate (see the module docstring); the generated cells are measured
    by default, as ``scidiff sample`` writes them (``observed=False``: smooth expression)."""
    import scanpy as sc  # lazy: scanpy is heavy and only the demo needs it (its bundled PBMCs)

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    progress, observed = yes_no("progress", progress), yes_no("observed", observed, OBSERVED)  # before training
    t_start = time.perf_counter()
    seed_everything(seed)
    adata = sc.datasets.pbmc68k_reduced()
    print(f"data: scanpy pbmc68k_reduced, {adata.n_obs} cells x {adata.raw.n_vars} genes (.raw, log-normalised), "
          f"{adata.obs['bulk_labels'].nunique()} cell types")
    config = load_config(overrides={"data": {"use_raw": True, "cell_type_key": "bulk_labels"},
                                    "training": {"batch_size": 128, "val_fraction": 0.0, "seed": seed,
                                                 "checkpoint_every": 0, "warmup_steps": 100}})
    model_dir = os.path.join(out_dir, "model")
    model = train(adata, model_dir, config, epochs=epochs, progress=progress)
    t_train = time.perf_counter() - t_start

    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    observed = model.resolve_observed(observed)
    parts, gen_labels = [], []
    for i, ct in enumerate(sorted(set(labels))):
        n = int((labels == ct).sum())
        part = generate(model, n, {"bulk_labels": ct}, seed=seed + i, progress=False, observed=observed)
        part.obs_names = [f"{name}-{i}" for name in part.obs_names]  # as scidiff sample names several groups
        parts.append(part)
        gen_labels += [ct] * n
    # uns: the first group's, as scidiff sample records them (seed: the first group's; group i: seed + i)
    generated = ad.concat(parts, index_unique=None, uns_merge="first")
    write_h5ad(generated, os.path.join(out_dir, "generated.h5ad"))

    real = log_expression_of(adata.raw.to_adata(), model.data_spec.gene_names)
    gen = generated.X
    metrics = evaluate_generation_quality(real, gen, labels, np.asarray(gen_labels))
    gauss = np.vstack([gaussian_pca_generator(real[labels == ct], int((labels == ct).sum()), 50, seed)
                       for ct in sorted(set(labels))])
    gauss_labels = np.concatenate([[ct] * int((labels == ct).sum()) for ct in sorted(set(labels))])
    baseline = evaluate_generation_quality(real, gauss, labels, gauss_labels)
    report_plots(real, gen, out_dir, seed=seed)
    cols = ["mmd", "energy_distance", "fid", "classifier_auc", "mean_correlation", "var_correlation",
            "gene_correlation"]
    summary = {"scidiff": {c: metrics[c] for c in cols}, "gaussian_baseline": {c: baseline[c] for c in cols}}
    result = {"summary": summary, "per_cell_type": metrics["per_cell_type"],
              "gaussian_per_cell_type": baseline["per_cell_type"], "epochs": epochs, "observed": observed,
              "train_seconds": round(t_train, 1), "total_seconds": round(time.perf_counter() - t_start, 1)}
    atomic_path(os.path.join(out_dir, "metrics.json"),
                lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1, default=float)))
    report = ("# scidiff demo report\n\n"
              f"Trained on scanpy's pbmc68k_reduced ({adata.n_obs} cells, {len(real[0])} genes) conditioned on "
              f"bulk_labels for {epochs} epochs ({t_train:.0f} s); generated as many cells of each type as the data "
              f"holds, {_kind(observed)}; scored against the real cells in 30 PCs fitted on the real cells. "
              "The Gaussian baseline samples each cell type from a Gaussian in 50 PCs of its real cells (fitted on "
              "all real cells, so it has seen the cells it is scored against). Lower is better for mmd, "
              "energy_distance, fid and classifier_auc (0.5 = indistinguishable); higher is better for the "
              "correlations.\n\n"
              + _table(summary, cols) +
              "\nPer cell type (scidiff):\n\n" + _table(metrics["per_cell_type"], ["mmd", "classifier_auc",
                                                                                    "mean_correlation"]) +
              "\nFigures: pca.png, umap.png, gene_means.png, gene_variances.png. Model: model/model.pt.\n")
    atomic_path(os.path.join(out_dir, "report.md"), lambda tmp: open(tmp, "w").write(report))
    print(report)
    print(f"demo finished in {result['total_seconds']:.0f} s; report in {os.path.join(out_dir, 'report.md')}")
    return result
