"""Pointing to the regulators behind a phenotype, on a real CRISPR screen.

Papalexi et al. 2021: THP-1 cells stimulated with interferon-gamma, 25 knockouts (cells with
``grna_frac_top >= 0.8``), split as the perturbation suite's seen task
(``bench/perturbation_tasks.py``: a third of each knockout's cells and of the controls held out).
A model trained on the rest (the suite's settings) screens every knockout
(:func:`scidiff.tasks.design.screen_perturbations`, from 256 held-out control cells: each cell
inverted under its own condition and decoded under every knockout, as smooth cells and as
measured ones) for a phenotype: an interferon-induced gene down, below the training control
cells' 10th percentile (PSMB9, the immunoproteasome subunit; APOBEC3G, where that level is 0: the
gene not detected). The truth is outside the data: the interferon-gamma signalling pathway the
screen was built to dissect (IFNGR1, IFNGR2, JAK2, STAT1 and the transcription factor IRF1,
Papalexi et al. 2021). Scored: the AUROC of the fraction of cells meeting the phenotype for the
pathway's knockouts against the other 20, and the Spearman correlation of that fraction with the
fraction measured in each knockout's held-out cells. Beside it: the same fractions from the
predictions of ``scidiff predict`` (:func:`scidiff.perturb`, measured as an alternative), the
fraction measured in each knockout's training cells (the data's own answer, which a screen of
seen knockouts should reproduce) and the held-out cells themselves (the reference's own AUROC).

    python bench/bench_regulators.py [--epochs 100] [--model-cache M.pt] [--out bench/results/regulators_papalexi.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from perturbation_tasks import DATA_DIR, papalexi_seen_task, train_scidiff

HERE = os.path.dirname(os.path.abspath(__file__))
PATHWAY = ("IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1")  # interferon-gamma receptor -> JAK/STAT -> IRF1
READOUTS = ("PSMB9", "APOBEC3G")


def measured_fraction(cells, gene: str, level: float, key: str = "perturbation") -> dict[str, float]:
    """Per label of ``key``, the fraction of ``cells`` whose ``gene`` is at most ``level``."""
    x = np.asarray(cells[:, gene].X).ravel()
    labels = cells.obs[key].astype(str).to_numpy()
    return {lab: float((x[labels == lab] <= level).mean()) for lab in np.unique(labels)}


def predicted_fractions(model, target, source, knockouts: list[str], steps: int, seed: int) -> dict[str, float]:
    """The alternative measured beside the screen: each knockout predicted for the source cells as
    ``scidiff predict`` predicts it (:func:`scidiff.perturb`: a seen knockout centred on its
    estimated mean change; measured cells, each control cell's measurement carried to its moved
    state), fraction meeting ``target``."""
    from scidiff.tasks.design.targets import constraint_hits, met_every_target
    from scidiff.tasks.perturb import perturb

    store, out = {}, {}
    for k in ["control"] + knockouts:
        pred = perturb(model, source.copy(), {"perturbation": k}, steps=steps, seed=seed, progress=False, store=store)
        out[k] = float(met_every_target(constraint_hits(np.asarray(pred.X), list(pred.var_names), target),
                                        pred.n_obs).mean())
    return out


def scores(fraction: dict[str, float], reference: dict[str, float], knockouts: list[str]) -> dict:
    """AUROC of ``fraction`` for the pathway's knockouts, Spearman with ``reference``, and the
    pathway's share of the top five."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    f = np.array([fraction[k] for k in knockouts])
    truth = np.array([k in PATHWAY for k in knockouts])
    top = [knockouts[i] for i in np.argsort(-f, kind="stable")[:len(PATHWAY)]]
    return {"auroc_pathway": float(roc_auc_score(truth, f)),
            "spearman_held_out": float(spearmanr(f, [reference[k] for k in knockouts])[0]),
            "pathway_in_top5": sum(k in PATHWAY for k in top) / len(PATHWAY), "top5": top}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--cells", type=int, default=256, help="held-out control cells the screen starts from")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-cache", default=None, help="read the trained model from this .pt, or write it there")
    p.add_argument("--out", default=os.path.join(HERE, "results", "regulators_papalexi.json"))
    args = p.parse_args(argv)

    import anndata as ad
    import torch

    from scidiff.tasks.design import InverseDesigner, PhenotypeTarget, screen_perturbations

    torch.set_num_threads(args.threads)
    task = papalexi_seen_task(args.data_dir, seed=args.seed)
    fold = task.folds[0]
    model, train_s = train_scidiff(fold.train, task.model_keys, args.seed, args.epochs, hidden_dim=args.hidden_dim,
                                   num_layers=args.num_layers, model_path=args.model_cache)
    held = ad.concat([fold.control] + [t.true for t in fold.targets])
    knockouts = [t.name for t in fold.targets]
    source = fold.control[np.random.default_rng(args.seed).choice(fold.control.n_obs, args.cells, replace=False)]
    train_control = fold.train[(fold.train.obs["perturbation"] == "control").to_numpy()]
    candidates = [{"perturbation": k} for k in ["control"] + knockouts]
    out = {}
    for gene in READOUTS:
        level = float(np.percentile(np.asarray(train_control[:, gene].X).ravel(), 10))
        phenotype = PhenotypeTarget(suppressed_genes={gene: level})
        fractions, seconds = {}, {}
        for kind in ("smooth", "measured"):
            t0 = time.perf_counter()
            table = screen_perturbations(InverseDesigner(model, observed=kind == "measured"), phenotype,
                                         source.copy(), candidates=candidates, n_cells=args.cells, steps=args.steps,
                                         seed=args.seed)
            seconds[kind] = round(time.perf_counter() - t0, 1)
            fractions[kind] = {row["condition"].split("=", 1)[1]: row["fraction_met"]
                               for row in table.to_dict("records")}
        fractions["predicted"] = predicted_fractions(model, phenotype, source, knockouts, args.steps, args.seed)
        reference = measured_fraction(held, gene, level)
        training = measured_fraction(fold.train, gene, level)
        rows = {"scidiff screen (smooth cells, the default designer)": scores(fractions["smooth"], reference,
                                                                                knockouts),
                "scidiff screen (measured cells, observed=True)": scores(fractions["measured"], reference, knockouts),
                "scidiff predict's predictions (not adopted)": scores(fractions["predicted"], reference, knockouts),
                "measured in the training cells": scores(training, reference, knockouts),
                "measured in the held-out cells (reference)": scores(reference, reference, knockouts)}
        out[gene] = {"level": level, "screen_seconds": seconds, "methods": rows,
                     "fraction_met": {k: {**{m: fractions[m][k] for m in fractions}, "training": training[k],
                                          "held_out": reference[k]} for k in ["control"] + knockouts}}
        for name, r in rows.items():
            print(f"{gene} <= {level:.2f} | {name:44s} AUROC {r['auroc_pathway']:.3f}  Spearman "
                  f"{r['spearman_held_out']:.3f}  pathway in top 5 {r['pathway_in_top5']:.1f}  {r['top5']}", flush=True)
    result = {"readouts": out, "pathway": list(PATHWAY),
              "setup": {"epochs": args.epochs, "hidden_dim": args.hidden_dim, "num_layers": args.num_layers,
                        "cells": args.cells, "steps": args.steps, "seed": args.seed, "threads": args.threads,
                        "train_seconds": round(train_s, 1), "machine": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch": torch.__version__}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
