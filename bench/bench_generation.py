"""Conditional generation quality on real data: Kang et al. 2018 IFN-beta PBMCs (default), or
scanpy's bundled pbmc68k_reduced (``--dataset pbmc68k_reduced``: 700 PBMCs, the 765
log-normalised genes of its ``.raw``, conditioned on ``bulk_labels``, 10 cell types; no condition
pair, so no DE table).

Kang: conditioned on cell_type x condition (14 groups); 20% of each group held out as test cells.
Per group, in a 30-PC space fitted on the real training cells (never on generated ones, and not
on the test cells, so that test and generated cells are both new to it; see
scidiff.evaluation.metrics): RBF-MMD, energy distance and a cross-validated real-vs-generated
random-forest AUC against the group's test cells, plus the pooled gene-mean Pearson (all test
cells vs all generated cells) and, in expression, SimBench's measured properties
(Kolmogorov-Smirnov statistics of genes detected and total expression per cell, detection
fraction, mean and variance per gene against the group's test cells:
``scidiff.evaluation.measurement_properties``). Next to the model: the floor (the group's real
training cells; they are in the PCA's own fit, which inflates their scores a little, so the floor is
conservative) and the baseline generator (a per-group Gaussian in 50 PCs of the group's training
cells, mapped back to genes, negatives clipped to 0). ``model``: what ``model.sample`` returns
by default (measured cells where the model has a fitted detection model: sparse, with the
training cells' detection rates); ``model_smooth``: the same cells' smooth expression
(``observed=False``, same seeds); ``projected``: the group's real training cells through the
model's own output path (their projection on its principal axes, measured by its detection
model), what a perfect generator would score through this latent and measurement. Intervals:
per group, AUC from a bootstrap of the out-of-fold scores and MMD/energy from 80% subsamples;
for the averages, a bootstrap over groups.

Differential expression: per cell type, the top 100 DE genes between stimulated and control
training cells (Welch's t), and on them the slope and Pearson of each generator's
stimulated-vs-control log fold changes against the held-out cells' (``scidiff.evaluation.
differential``); the training cells themselves are the ceiling (two disjoint real samples, the
same gene choice). A memorisation check compares each generated cell's distance to its nearest
training cell with the same distance for the test cells.

    python bench/bench_generation.py [--epochs 800] [--out bench/results/generation_kang.json]
    python bench/bench_generation.py --dataset pbmc68k_reduced --epochs 400 --out bench/results/generation_pbmc68k_reduced.json
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
from scipy.spatial.distance import cdist

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "kang_ifnb_pbmc.h5ad")
MIN_TEST_CELLS = 5  # groups with fewer held-out cells are left out of the scores (pbmc68k_reduced has 3)


def split_groups(labels: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        rng.shuffle(idx)
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    return ~test, test


def held_out_split(adata, keys, seed: int, test_fraction: float = 0.2):
    """Each cell's group (its ``keys`` values joined by `` | ``) and the split of every group into
    training and held-out cells (:func:`split_groups`): ``(groups, train, test)``."""
    groups = adata.obs[list(keys)].astype(str).agg(" | ".join, axis=1).to_numpy()
    return (groups, *split_groups(groups, test_fraction, seed))


AUC_REPEATS = 10  # classifier draws per group (oof_auc_with_ci: one draw's 14-group mean is noisy)


def oof_auc_with_ci(x, y, seed=0, n_boot=200, repeats=AUC_REPEATS):
    """``scidiff.evaluation.metrics.classifier_auc`` (a random forest's cross-validated AUC,
    averaged over ``repeats`` draws of the subsample, the folds and the forest's seed) with a
    bootstrap interval over cells (each draw's out-of-fold scores resampled, the draws' AUCs
    averaged). With tens of cells a group, one draw's mean over Kang's 14 groups moved by up to
    0.08 between scorer seeds (0.52-0.60 for the same real cells), the size of the differences
    being measured; ten draws bring that spread down about threefold. ``repeats=1`` is the
    scorer of results written before the repeats (same numbers)."""
    from sklearn.metrics import roc_auc_score

    from scidiff.evaluation.metrics import classifier_scores

    rng = np.random.default_rng(seed)
    labels, runs = classifier_scores(x, y, seed=seed, repeats=repeats, rng=rng)
    auc = float(np.mean([roc_auc_score(labels, sc) for sc in runs]))
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(labels), len(labels))
        if labels[i].min() != labels[i].max():
            boots.append(np.mean([roc_auc_score(labels[i], sc[i]) for sc in runs]))
    return auc, np.asarray(boots)


def projected_cells(model, x, seed: int) -> np.ndarray:
    """The group's real training cells ``x`` (model space) as a perfect generator would give them
    through this model's output path: their projection on the model's principal axes, measured by
    its detection model where the default output is measured (``model.resolve_observed()``), so
    what the latent and the measurement cost, apart from the diffusion, shows beside the model."""
    with torch.no_grad():
        smooth = model.decode(model.encode(x.to(torch.float32)))
        if model.resolve_observed():
            return model.observe(smooth, generator=torch.Generator().manual_seed(seed)).numpy()
        return model.data_spec.to_expression(smooth).numpy()


def score_group(test_pcs, gen_pcs, seed, n_boot=50, repeats=AUC_REPEATS):
    from scidiff.evaluation import energy_distance, mmd_rbf
    from scidiff.evaluation.metrics import _median_sq_dist

    rng = np.random.default_rng(seed)
    h = _median_sq_dist(test_pcs)
    out = {"mmd": mmd_rbf(test_pcs, gen_pcs, bandwidth=h), "energy_distance": energy_distance(test_pcs, gen_pcs)}
    out["classifier_auc"], auc_boot = oof_auc_with_ci(test_pcs, gen_pcs, seed, repeats=repeats)
    subs = {"mmd": [], "energy_distance": []}
    for _ in range(n_boot):
        a = test_pcs[rng.choice(len(test_pcs), max(3, int(0.8 * len(test_pcs))), replace=False)]
        b = gen_pcs[rng.choice(len(gen_pcs), max(3, int(0.8 * len(gen_pcs))), replace=False)]
        subs["mmd"].append(mmd_rbf(a, b, bandwidth=h))
        subs["energy_distance"].append(energy_distance(a, b))
    subs["classifier_auc"] = auc_boot
    out["interval95"] = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in subs.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--dataset", default="kang", choices=["kang", "pbmc68k_reduced"],
                   help="kang: --data (cell_type x condition); pbmc68k_reduced: scanpy's bundled cells (bulk_labels)")
    p.add_argument("--epochs", type=int, default=800,
                   help="epochs of training (fixed, so that the figures reproduce on any machine)")
    p.add_argument("--minutes", type=float, default=None,
                   help="a training time budget instead (sets the epochs from this machine's speed)")
    p.add_argument("--genes", default="hvg", choices=["hvg", "all"])
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--latent-dim", type=int, default=64, help="0 = diffuse in gene space")
    p.add_argument("--dropout", type=float, default=None, help="the score network's dropout (default: the model's)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (the trainer's default)")
    p.add_argument("--axis-sigma-data", action="store_true",
                   help="precondition each latent axis with its own standard deviation (ScIDiffModel(axis_sigma_data=True))")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sampler", default=None, help="the sampler (default: model.sample's)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--auc-repeats", type=int, default=AUC_REPEATS,
                   help="classifier repeats per group for the AUC (1: the scorer of results written before them)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "generation_kang.json"))
    p.add_argument("--save-model", default=None, help="also write the trained model here (a .pt checkpoint)")
    p.add_argument("--load-model", default=None,
                   help="score this checkpoint (from --save-model with the same --seed) instead of training")
    p.add_argument("--as-scidiff-train", action="store_true",
                   help="train exactly as `scidiff train --condition-keys ...` does with the packaged config "
                        "(its epochs and 10%% validation split) instead of the flags above")
    p.add_argument("--final-sigma", default="0",
                   help="with --as-scidiff-train: training.final_sigma, the noise level generation ends at (0: clean "
                        "data, the packaged default; auto: fitted on the validation cells); with --load-model: a "
                        "level to end at (0: the model's own)")
    p.add_argument("--early-stopping-patience", type=int, default=None,
                   help="with --as-scidiff-train: stop on the validation loss (the packaged config's default before "
                        "it was measured here was 50)")
    args = p.parse_args(argv)
    if args.dataset == "kang" and not os.path.exists(args.data):
        sys.exit(f"missing {args.data}: this benchmark needs ../shared/data beside the project")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import scidiff
    from scidiff.evaluation import fit_pca, measurement_properties
    from scidiff.evaluation.baselines import gaussian_pca_generator
    from scidiff.diffusion.plans import DEFAULT_SAMPLER

    if args.dataset == "kang":
        adata, keys = scidiff.data.read_h5ad(args.data), ["cell_type", "condition"]
        n_top_genes = args.n_top_genes if args.genes == "hvg" else None
    else:
        import scanpy as sc

        adata, keys, n_top_genes = sc.datasets.pbmc68k_reduced().raw.to_adata(), ["bulk_labels"], None
    groups, train_mask, test_mask = held_out_split(adata, keys, args.seed)
    train_ad = adata[train_mask].copy()
    sampler = args.sampler or DEFAULT_SAMPLER
    if args.load_model:
        from scidiff.training.checkpoint import load_model

        model, history, train_s = load_model(args.load_model), None, 0.0
        if args.final_sigma != "auto":  # a level to end at (the model's own where 0)
            model.final_sigma.fill_(float(args.final_sigma) or float(model.final_sigma))
        genes = model.data_spec.gene_names
        cells_all = scidiff.transform_like(model.data_spec, adata)
    elif args.as_scidiff_train:  # the default command, as a new user runs it
        import tempfile

        from scidiff.config import load_config
        from scidiff.tasks.train import train as scidiff_train

        with tempfile.TemporaryDirectory() as run:
            t0 = time.perf_counter()
            overrides = {"training": {"seed": args.seed, "early_stopping_patience": args.early_stopping_patience,
                                      "final_sigma": args.final_sigma},
                         "model": {"axis_sigma_data": args.axis_sigma_data}}
            model = scidiff_train(train_ad, run, load_config(overrides=overrides),
                                  condition_keys=keys, progress=False)
            train_s = time.perf_counter() - t0
            import csv

            with open(os.path.join(run, "history.csv")) as fh:
                history = [{"train_loss": float(row["train_loss"])} for row in csv.DictReader(fh)]
        genes = model.data_spec.gene_names
        cells_all = scidiff.transform_like(model.data_spec, adata)
    else:
        data = scidiff.setup_anndata(train_ad, condition_keys=keys, n_top_genes=n_top_genes)
        genes = data.spec.gene_names
        cells_all = scidiff.transform_like(data.spec, adata)
        extra = {"axis_sigma_data": args.axis_sigma_data, **({} if args.dropout is None else {"dropout": args.dropout})}
        model = scidiff.ScIDiffModel.from_data(data, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                                               latent_dim=args.latent_dim or None, **extra)
        loader = data.loader(batch_size=args.batch_size, seed=args.seed)
        epochs = args.epochs
        if args.minutes is not None:  # as many epochs as fit the time budget, timed on a throwaway copy
            probe = scidiff.ScIDiffModel.from_data(data, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                                                   latent_dim=args.latent_dim or None)
            t0 = time.perf_counter()
            scidiff.ScIDiffTrainer(probe, loader, device="cpu", progress=False).train(3)
            epochs = max(1, int(args.minutes * 60 / ((time.perf_counter() - t0) / 3)))
        trainer = scidiff.ScIDiffTrainer(model, loader, device="cpu", learning_rate=args.lr,
                                         weight_decay=args.weight_decay, early_stopping_patience=None, seed=args.seed, progress=False)
        t0 = time.perf_counter()
        history = trainer.train(epochs)
        train_s = time.perf_counter() - t0
    if args.save_model and not args.load_model:
        from scidiff.training.checkpoint import save_model

        save_model(model, args.save_model, split_seed=args.seed)

    real_all = cells_all.log_expression()
    project = fit_pca(real_all[train_mask], 30, args.seed)
    pcs = project(real_all)
    from scidiff.evaluation.differential import de_preservation

    methods = ("model", "model_smooth", "projected", "gaussian", "floor")
    metric_names = ("mmd", "energy_distance", "classifier_auc")
    results = {"groups": {}}
    pooled = {"real": [], **{m: [] for m in methods}}
    cells = {}  # group labels -> method -> cells, for the DE table
    nn = {"test": [], "model": []}
    t_sample = 0.0
    for gi, g in enumerate(np.unique(groups)):
        labels = tuple(g.split(" | "))
        condition = dict(zip(keys, labels))
        tr, te = train_mask & (groups == g), test_mask & (groups == g)
        if te.sum() < MIN_TEST_CELLS:  # a 5-fold classifier AUC needs 5 held-out cells
            results.setdefault("unscored_groups", {})[g] = {"n_train": int(tr.sum()), "n_test": int(te.sum())}
            print(f"{g:32s} not scored: {int(te.sum())} held-out cells (< {MIN_TEST_CELLS})", flush=True)
            continue
        n_gen = int(tr.sum())
        t1 = time.perf_counter()
        gen = model.sample(n_gen, condition, sampler=sampler, steps=args.steps, seed=args.seed + gi).numpy()
        t_sample += time.perf_counter() - t1
        smooth = model.sample(n_gen, condition, sampler=sampler, steps=args.steps, seed=args.seed + gi,
                              observed=False).numpy()
        gauss = gaussian_pca_generator(real_all[tr], n_gen, 50, seed=args.seed + gi)
        projected = projected_cells(model, cells_all.x[torch.as_tensor(np.flatnonzero(tr))], args.seed + gi)
        sets = {"model": project(gen), "model_smooth": project(smooth), "projected": project(projected),
                "gaussian": project(gauss), "floor": pcs[tr]}
        cells[labels] = {"model": gen, "model_smooth": smooth, "projected": projected, "gaussian": gauss,
                         "floor": real_all[tr], "test": real_all[te]}
        row = {"n_train": int(tr.sum()), "n_test": int(te.sum())}
        for m in methods:
            row[m] = score_group(pcs[te], sets[m], args.seed, repeats=args.auc_repeats)
            row[m]["measurement"] = measurement_properties(real_all[te], cells[labels][m])
        results["groups"][g] = row
        pooled["real"].append(real_all[te])
        for m in methods:
            pooled[m].append(cells[labels][m])
        # memorisation: nearest training cell (same group, 30-PC space), for generated vs test cells
        nn["model"].append(cdist(sets["model"], pcs[tr]).min(1))
        nn["test"].append(cdist(pcs[te], pcs[tr]).min(1))
        print(f"{g:32s} " + "  ".join(f"{m}: auc {row[m]['classifier_auc']:.3f} mmd {row[m]['mmd']:.4f} "
                                       f"E {row[m]['energy_distance']:.3f}" for m in methods), flush=True)
    rng = np.random.default_rng(args.seed)
    names = list(results["groups"])
    boot_groups = [rng.integers(0, len(names), len(names)) for _ in range(2000)]
    summary = {}
    real_mean = np.concatenate(pooled["real"]).mean(0)
    for m in methods:
        summary[m] = {}
        for k in metric_names:
            vals = np.array([results["groups"][g][m][k] for g in names])
            boots = [vals[i].mean() for i in boot_groups]
            summary[m][k] = {"mean": float(vals.mean()),
                             "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
        summary[m]["gene_mean_pearson"] = float(np.corrcoef(real_mean, np.concatenate(pooled[m]).mean(0))[0, 1])
        summary[m]["measurement"] = {k: float(np.mean([results["groups"][g][m]["measurement"][k] for g in names]))
                                     for k in results["groups"][names[0]][m]["measurement"]}
    de = {}
    conditions = sorted({labels[-1] for labels in cells}) if len(keys) == 2 else []
    control, treated = ("control", "stimulated") if set(conditions) == {"control", "stimulated"} else \
        (conditions + [None, None])[:2]
    for ct in sorted({labels[0] for labels in cells}) if len(keys) == 2 else []:
        if (ct, control) not in cells or (ct, treated) not in cells:
            continue
        a, b = cells[(ct, control)], cells[(ct, treated)]
        row = de_preservation(a["test"], b["test"], {m: (a[m], b[m]) for m in methods},
                              reference=(a["floor"], b["floor"]), n_genes=100)
        row["genes"] = [genes[i] for i in row["genes"]]
        de[ct] = row
        print(f"DE {ct:20s} " + "  ".join(f"{m}: slope {row[m]['slope']:.2f} r {row[m]['pearson']:.2f}"
                                          for m in methods), flush=True)
    summary["de_preservation"] = {m: {k: float(np.nanmean([de[c][m][k] for c in de])) for k in ("slope", "pearson")}
                                  for m in methods} if de else None
    results["de_preservation"] = de
    test_nn, gen_nn = np.concatenate(nn["test"]), np.concatenate(nn["model"])
    summary["memorisation"] = {
        "median_nn_distance_test_to_train": float(np.median(test_nn)),
        "median_nn_distance_generated_to_train": float(np.median(gen_nn)),
        "fraction_generated_closer_than_5pct_of_test": float((gen_nn < np.percentile(test_nn, 5)).mean())}
    beats = all(summary["model"][k]["mean"] < summary["gaussian"][k]["mean"] for k in metric_names)
    results.update({
        "summary": summary,
        "goal_met": bool(beats and summary["model"]["gene_mean_pearson"] >= 0.98),
        "goals": {"default_beats_gaussian_on_mmd_energy_auc": bool(beats),
                  "default_auc_at_most_0.52": bool(summary["model"]["classifier_auc"]["mean"] <= 0.52),
                  "de_slope_and_pearson_at_least_0.9": None if not de else bool(
                      summary["de_preservation"]["model"]["slope"] >= 0.9
                      and summary["de_preservation"]["model"]["pearson"] >= 0.9)},
        "setup": {"data": os.path.basename(args.data) if args.dataset == "kang" else "scanpy pbmc68k_reduced (.raw)",
                  "condition_keys": keys, "genes": len(genes), "gene_selection": args.genes,
                  "groups": len(results["groups"]), "hidden_dim": args.hidden_dim, "num_layers": args.num_layers,
                  "latent_dim": args.latent_dim, "axis_sigma_data": bool(args.axis_sigma_data),
                  "as_scidiff_train": bool(args.as_scidiff_train),
                  "early_stopping_patience": args.early_stopping_patience if args.as_scidiff_train else None,
                  "final_sigma": float(model.final_sigma),
                  "epochs": len(history) if history else None, "train_seconds": round(train_s, 1),
                  "default_output": "measured" if model.resolve_observed() else "smooth",
                  "sampler": sampler, "sampler_steps": args.steps, "sample_seconds": round(t_sample, 1),
                  "final_train_loss": history[-1]["train_loss"] if history else None, "seed": args.seed,
                  "threads": args.threads,
                  "auc_repeats": args.auc_repeats,
                  "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "torch": torch.__version__},
    })
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, args.out)
    for m in methods:
        print(f"{m:9s} " + "  ".join(f"{k} {summary[m][k]['mean']:.4f} [{summary[m][k]['ci95'][0]:.4f}, "
                                     f"{summary[m][k]['ci95'][1]:.4f}]" for k in metric_names)
              + f"  gene-mean r {summary[m]['gene_mean_pearson']:.4f}")
    for m in methods:
        print(f"{m:9s} KS " + "  ".join(f"{k} {v:.3f}" for k, v in summary[m]["measurement"].items()))
    for m in methods if de else []:
        print(f"DE {m:12s} slope {summary['de_preservation'][m]['slope']:.3f} "
              f"pearson {summary['de_preservation'][m]['pearson']:.3f}")
    print("memorisation", summary["memorisation"], "goal met:", results["goal_met"])


if __name__ == "__main__":
    main()
