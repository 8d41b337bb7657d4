"""What the seen route's shrinkage trades, measured inside the training cells of Papalexi's seen task.

The training cells of the ``papalexi_seen`` fold (two thirds of each knockout and the controls)
are split at random into halves A and B, ``--repeats`` times. Each knockout's mean change is
estimated on A (its cells against A's controls) and scored against B's: RMSE and MAE over the
genes, and PDS (cell-eval's L1 discrimination among the knockouts, the knocked-out gene's own
column left out). B's noise adds the same to every estimator, so the ranking is the estimators'.
Estimators: the raw change (the mean shift), no change, the adaptive shrinkage of the seen route
(:func:`scidiff.models.shrinkage.adaptive_shrinkage`), and three alternatives: positive-part
James-Stein per knockout (the whole change scaled by ``max(0, 1 - (G - 2) / sum z^2)``), the
midpoint of the raw and the shrunk change, adaptive shrinkage in the principal axes of A's
control cells (the changes rotated, each axis with its own exact standard error, rotated back),
the shrunk change rescaled to the unbiased estimate of the true change's norm
(``sqrt(max(0, |d|^2 - sum s^2))``), and a whole-knockout selection (the raw change where the
knockout's chi-square test of no change, ``sum z^2`` on G degrees of freedom, gives p < 0.01; no
change elsewhere), which tells whether PDS is lost on the knockouts without an effect or by
shrinking genes within those with one; adaptive shrinkage with one prior over the whole screen
(every knockout and gene) and with one prior per gene (over the knockouts), which let strong
knockouts teach the prior of weak ones; the shrunk change plus the raw residual's top 8 singular
directions (whitened), for a weak effect shared by knockouts; and the replicates' composition
alone (each knockout's mix of replicates applied to the replicates' control means), for whether
the raw change's PDS comes from the knockouts' cells sitting in other replicates than the
controls'; and the raw change times 0.6, 0.8, 1.2, 1.5 and 2, for how PDS answers the size of a
predicted change whatever its accuracy. The standard errors' calibration is the mean
of ``(d_A - d_B)^2 / (s_A^2 + s_B^2)`` (1 when they are right). The test third is never read.

    python bench/bench_shrinkage.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


SCALES = (0.6, 0.8, 1.2, 1.5, 2.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default=os.path.join(HERE, "results", "shrinkage_papalexi.json"))
    args = p.parse_args(argv)

    import numpy as np

    import machine_info
    import scidiff
    from perturbation_tasks import papalexi_seen_task
    from scidiff.evaluation.perturbation import discrimination_score
    from scidiff.models.effects import group_changes
    from scidiff.models.shrinkage import adaptive_shrinkage

    t0 = time.perf_counter()
    fold = papalexi_seen_task().folds[0]
    cells = scidiff.setup_anndata(fold.train.copy(), n_top_genes=None, perturbation_keys=["perturbation"],
                                  control_labels=["control"])
    x = cells.x.double().numpy()
    rows = cells.covariates["perturbation"][:, :-1].double().numpy()
    no_context = np.zeros((len(x), 0), dtype=np.int64)
    vocab, genes = cells.spec.categorical["perturbation"], list(cells.spec.gene_names)
    reps = fold.train.obs["bio_rep"].astype(str).to_numpy()
    def james_stein(d, s2):
        z2 = (d**2 / s2).sum(1, keepdims=True)
        return d * np.clip(1 - (d.shape[1] - 2) / z2, 0, 1)

    def rescaled(d, s2):
        shrunk = adaptive_shrinkage(d, s2)
        target = np.sqrt(np.maximum((d**2).sum(1) - s2.sum(1), 0))
        norm = np.sqrt((shrunk**2).sum(1))
        return shrunk * np.where(norm > 0, target / np.maximum(norm, 1e-30), 0.0)[:, None]

    def selected(d, s2):
        from scipy.stats import chi2

        return d * (chi2.sf((d**2 / s2).sum(1), d.shape[1]) < 0.01)[:, None]

    def residual_axes(d, s2, k=8):
        shrunk = adaptive_shrinkage(d, s2)
        u, s, vt = np.linalg.svd((d - shrunk) / np.sqrt(s2), full_matrices=False)
        return shrunk + ((u[:, :k] * s[:k]) @ vt[:k]) * np.sqrt(s2)

    estimators = {"mean_shift": lambda d, s2: d, "no_change": lambda d, s2: np.zeros_like(d),
                  "adaptive_shrinkage": adaptive_shrinkage, "james_stein": james_stein,
                  "midpoint": lambda d, s2: 0.5 * (d + adaptive_shrinkage(d, s2)),
                  "shrinkage_in_control_axes": None, "shrinkage_rescaled_to_norm": rescaled,
                  "significant_knockouts_whole": selected,
                  "shrinkage_one_prior_for_the_screen":
                      lambda d, s2: adaptive_shrinkage(d.reshape(1, -1), s2.reshape(1, -1)).reshape(d.shape),
                  "shrinkage_one_prior_per_gene": lambda d, s2: adaptive_shrinkage(d.T.copy(), s2.T.copy()).T,
                  "shrinkage_plus_residual_top8": residual_axes, "replicate_composition_only": None}
    for c in SCALES:  # PDS against the size of the change: the raw change shrunk or inflated
        estimators[f"mean_shift_times_{c}"] = lambda d, s2, c=c: c * d
    scores = {k: {"rmse": [], "mae": [], "pds_l1": []} for k in estimators}
    calibration = []
    for rep in range(args.repeats):
        half = np.random.default_rng(rep).random(len(x)) < 0.5
        _, design_a, d_a, _, s2_a = group_changes(x[half], rows[half], no_context[half])
        _, design_b, d_b, _, s2_b = group_changes(x[~half], rows[~half], no_context[~half])
        if not np.array_equal(design_a, design_b):
            raise RuntimeError("a knockout has cells in one half only; use another split")
        names = [vocab[int(np.flatnonzero(r)[0])] for r in design_a]
        exclude = [[genes.index(n)] if n in genes else None for n in names]
        calibration.append(float(np.mean((d_a - d_b) ** 2 / (s2_a + s2_b))))
        control = x[half][rows[half].sum(1) == 0]
        axes = np.linalg.svd(control - control.mean(0), full_matrices=False)[2].T  # [G, G] orthonormal
        _, _, d_rot, _, s2_rot = group_changes(x[half] @ axes, rows[half], no_context[half])
        composition = _composition(x[half], rows[half], reps[half], design_a)
        for name, estimate in estimators.items():
            if name == "replicate_composition_only":
                pred = composition
            else:
                pred = adaptive_shrinkage(d_rot, s2_rot) @ axes.T if estimate is None else estimate(d_a, s2_a)
            scores[name]["rmse"].append(float(np.sqrt(((pred - d_b) ** 2).mean(1)).mean()))
            scores[name]["mae"].append(float(np.abs(pred - d_b).mean()))
            scores[name]["pds_l1"].append(float(discrimination_score(pred, d_b, "l1", exclude=exclude).mean()))
    summary = {k: {m: float(np.mean(v)) for m, v in s.items()} for k, s in scores.items()}
    result = {"data": "papalexi21_thp1_sceptre_lowmoi.h5ad", "cells": int(len(x)), "knockouts": len(names),
              "repeats": args.repeats, "se2_calibration": float(np.mean(calibration)), "summary": summary,
              "per_repeat": scores, "seconds": round(time.perf_counter() - t0, 1),
              "machine": machine_info.machine(scidiff=scidiff.__version__)}
    machine_info.write_json(args.out, result)
    print(f"standard errors' calibration {result['se2_calibration']:.3f} (1 = right)")
    print("| estimator (on half A, scored on half B) | RMSE | MAE | PDS |\n|---|---|---|---|")
    for k, s in summary.items():
        print(f"| {k} | {s['rmse']:.4f} | {s['mae']:.4f} | {s['pds_l1']:.3f} |")
    print(f"-> {args.out}")


def _composition(x, rows, reps, design):
    """Per knockout (the rows of ``design``, group_changes' order), its cells' mix of replicates
    applied to the replicates' control means, minus the controls' mean."""
    import numpy as np

    control = rows.sum(1) == 0
    names = sorted(set(reps))
    means = {r: x[control & (reps == r)].mean(0) for r in names}
    base = x[control].mean(0)
    out = []
    for row in design:
        cells = rows[:, int(np.flatnonzero(row)[0])] > 0
        share = {r: float(np.mean(reps[cells] == r)) for r in names}
        out.append(sum(share[r] * means[r] for r in names) - base)
    return np.stack(out)


if __name__ == "__main__":
    main()
