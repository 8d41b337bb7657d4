"""Inverse design on real data: guide generation to a target phenotype, against baselines.

Kang et al. 2018 IFN-beta PBMCs (model: cell_type covariate, condition as perturbation, 2,000
HVGs plus the target genes, 64-dim latent). Start from the real control CD4T cells (DDIM
inversion under their own condition, guided decoding with the perturbation left unspecified)
and target the interferon response: ISG15 and IFIT1 at least at the 25th percentile of real
stimulated CD4T cells. Scored against real stimulated and control CD4T cells: E-distance and a
random-forest classifier AUC (cross-fitted 30-PC space, scidiff.evaluation.design.realism), a
stimulated-vs-control classifier trained on real CD4T cells, and the in-silico screen's ranking
of the model's perturbation conditions.

pbmc68k_reduced (scanpy; .raw log-normalised; model conditioned on bulk_labels, 765 genes):
population design from noise (no cell type given) toward a marker profile, CD8A and CD8B up
(>= 0.5) and CD4 down (<= 0.1). Scored by where the designed cells sit among real cells (the
types of their nearest real neighbours; the two CD8 labels pooled as 'CD8 T') and a classifier
AUC against the real CD8 T cells.

Beside each design: the design with ``select`` (the decoding condition drawn per cell from its
posterior given the target: the in-silico screen's fraction met times the condition's share of
training cells), a sweep of the guidance scale (0 = resampling only), the unguided model,
unguided sampling + rejection (samples per hit), direct gradient descent on expression without
the prior, and the model's own conditional samples of the matching group (the realism a perfect
designer could reach with this model). Goal: >= 90% of designed cells meet every target,
realism AUC <= 0.70, >= 10x fewer samples than rejection.

``observed`` rows design measured cells (``InverseDesigner(model, observed=True)``): guidance
acts on each cell's smooth expression, and the designed cell is a measurement of it through the
model's detection model, with the data's sparsity (95% zeros in Kang); the smooth rows compare
smooth (dense) cells with sparse real ones. Their rejection baselines sample measured cells too.
By default the target genes' measurement is conditioned on their intervals; ``free measurement``
rows draw it unconditioned, ``reweighted measurement`` rows also resample the cells by the
probability of an on-target measurement (the model's exact measured posterior).

    python bench/bench_design.py [--model-dir DIR] [--out bench/results/design.json]
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


KANG_SELECT = "design, select=condition, guidance 1, eta 1, retries 10"
KANG_SELECT_KW = {"select": "condition", "objective_scale": 1.0, "eta": 1.0, "retries": 10}
KANG_OBSERVED = "observed " + KANG_SELECT
PBMC_SELECT = "design, select=bulk_labels, guidance 1, eta 1, no resampling, retries 10"
PBMC_SELECT_KW = {"select": "bulk_labels", "objective_scale": 1.0, "eta": 1.0, "resample": False, "retries": 10}
PBMC_OBSERVED = "observed " + PBMC_SELECT
OBSERVED_DEFAULTS = "observed design, retries 2 (scidiff design as packaged)"
FREE = ", free measurement"
FREE_KW = {"condition_measurement": False}


def over_seeds(first, design, score_fn, ref, seeds):
    """The headline numbers of one design setting over several seeds (the realism AUC of a few
    hundred cells against a few hundred real ones moves by several hundredths between seeds);
    ``first``: the scores already computed for ``seeds[0]``."""
    runs = []
    for seed in seeds:
        s = first if seed == seeds[0] else score_fn(design(seed).expression)
        runs.append({"seed": seed, "fraction_met_all": s["fraction_met_all"],
                     "classifier_auc": s[f"vs {ref}"]["classifier_auc"], "e_distance": s[f"vs {ref}"]["e_distance"]})
    return {"runs": runs, **{f"mean_{k}": float(np.mean([r[k] for r in runs]))
                             for k in ("fraction_met_all", "classifier_auc", "e_distance")}}


def train_or_load(name, data, epochs, model_dir, seed):
    import scidiff
    from scidiff.training import load_model, save_model

    path = os.path.join(model_dir, f"{name}_model.pt") if model_dir else None
    if path and os.path.exists(path):
        model = load_model(path, genes=data.spec.gene_names)
        info = {"trained": False, "loaded_from": path}
        if not bool(model.detection.fitted):  # saved before the detection model
            model.fit_detection(data.x)
            info["detection_model"] = "fitted on the training cells after loading"
        return model, info
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = scidiff.ScIDiffModel.from_data(data, hidden_dim=512, num_layers=6, latent_dim=64)
    scidiff.ScIDiffTrainer(model, data.loader(256, seed=seed), device="cpu", early_stopping_patience=None,
                           seed=seed, progress=False).train(epochs)
    if path:
        save_model(model, path)
    return model.eval(), {"trained": True, "epochs": epochs, "train_seconds": round(time.perf_counter() - t0, 1)}


def hits_fn(target, genes):
    from scidiff.tasks.design import constraint_hits

    return lambda x: np.all(np.stack(list(constraint_hits(x, genes, target).values())), axis=0)


def score(designed, real, labels, refs, hits, seed):
    """Fraction meeting every target and realism against each reference label."""
    from scidiff.evaluation.design import realism

    out = {"n": int(len(designed)), "fraction_met_all": float(hits(designed).mean())}
    for ref in refs:
        r = realism(designed, real, labels, reference_label=ref, seed=seed)
        out[f"vs {ref}"] = {k: r[k] for k in ("classifier_auc", "e_distance", "nn_distance_ratio")}
        out[f"vs {ref}"]["diversity_ratio"] = r["diversity"]["ratio"]
        out["nearest_type_composition"] = r["nearest_type_composition"]
    return out


def cost(settings, met):
    """Decodings and sampler steps per cell that meets every target: a retry counts as the share
    of a decoding it re-runs; the steps include inversion and the condition screen."""
    st = settings["sampler_steps_per_cell"]
    per_hit = 1.0 / max(met, 1e-9)
    return {"samples_per_hit": (st["decoding"] + st["retries"]) / st["decoding"] * per_hit,
            "sampler_steps_per_hit": sum(st.values()) * per_hit}


def against_rejection(s, rejection, steps):
    """How many times fewer samples (and sampler steps) the design needs per hit than rejection."""
    rej = rejection["samples_per_hit_lower_bound"]
    return {"fewer_samples": rej / s["cost"]["samples_per_hit"],
            "fewer_sampler_steps": rej * steps / s["cost"]["sampler_steps_per_hit"]}


def meeting(sample, hits, n, seed):
    """``n`` of the model's own samples that meet the target (drawn in chunks until enough hit):
    the realism an exact conditional sampler of this model would reach."""
    kept, k = [], 0
    while sum(len(x) for x in kept) < n:
        x = sample(512, seed + 1000 + k)
        kept.append(x[hits(x)])
        k += 1
    return np.vstack(kept)[:n]


def split_half(labels, label, seed):
    """Half of the real cells of ``label`` (to score as if designed) and every other real cell
    (the reference): the split-half floor of the realism scores."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(labels == label)
    half = rng.choice(idx, len(idx) // 2, replace=False)
    return half, np.setdiff1d(np.arange(len(labels)), half)


def line(name, s, refs):
    parts = [f"met {s['fraction_met_all']:.3f}"]
    for ref in refs:
        r = s[f"vs {ref}"]
        parts.append(f"[{ref}] AUC {r['classifier_auc']:.3f} E {r['e_distance']:.2f} div {r['diversity_ratio']:.2f}")
    return f"{name:34s} " + "  ".join(parts)


def kang(args, results):
    import scidiff
    from scidiff.data.preprocess import select_genes
    from scidiff.evaluation import fit_pca
    from scidiff.evaluation.design import direct_gradient_baseline, rejection_baseline
    from scidiff.tasks.design import gene_attribution, screen_perturbations
    from sklearn.linear_model import LogisticRegression

    path = os.path.join(SHARED, "kang_ifnb_pbmc.h5ad")
    adata = scidiff.data.read_h5ad(path)
    targets = ["ISG15", "IFIT1"]
    hv = select_genes(adata.X, adata.var_names, None, 2000)
    genes = hv + [g for g in targets if g not in hv]
    data = scidiff.setup_anndata(adata, genes=genes, condition_keys=["cell_type"], perturbation_keys=["condition"])
    model, train_info = train_or_load("kang", data, args.kang_epochs, args.model_dir, args.seed)
    real = adata[:, genes].X.toarray().astype(np.float32)
    ct, cond = adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["condition"].astype(str).to_numpy()
    labels = np.array([f"{a} | {b}" for a, b in zip(ct, cond)])
    stim_label, ctrl_label = "CD4T | stimulated", "CD4T | control"
    gi = {g: i for i, g in enumerate(genes)}
    levels = {g: round(float(np.percentile(real[labels == stim_label, gi[g]], 25)), 3) for g in targets}
    target = scidiff.PhenotypeTarget(marker_genes=levels, tolerance=0.1)
    hits = hits_fn(target, genes)
    refs = [stim_label, ctrl_label]
    source = adata[labels == ctrl_label].copy()
    designer = scidiff.InverseDesigner(model, observed=False)
    n = args.n

    # a stimulated-vs-control classifier trained on the real CD4T cells
    project = fit_pca(real, 30, args.seed)
    cd4 = np.isin(labels, refs)
    state = LogisticRegression(max_iter=2000).fit(project(real[cd4]), labels[cd4] == stim_label)

    out = {"target": [str(c) for c in target.constraints], "levels_from": "25th percentile of real stimulated CD4T",
           "n_source_cells": int(source.n_obs), "model": train_info, "methods": {}}

    def add(name, cells, extra=None, reals=real, reals_labels=labels):
        s = score(cells, reals, reals_labels, refs, hits, args.seed)
        s["fraction_classified_stimulated"] = float(state.predict(project(cells)).mean())
        s.update(extra or {})
        if "settings" in s:
            s["cost"] = cost(s["settings"], s["fraction_met_all"])
        out["methods"][name] = s
        print(line(name, s, refs) + f"  stim-clf {s['fraction_classified_stimulated']:.2f}", flush=True)
        return s

    add("real control CD4T (source)", real[labels == ctrl_label])
    half, rest = split_half(labels, stim_label, args.seed)
    add("real stimulated CD4T, held-out half (floor)", real[half], reals=real[rest], reals_labels=labels[rest])
    t0 = time.perf_counter()
    res = designer.design(target, n, source=source, steps=args.steps, seed=args.seed)
    add("design", res.expression, {"seconds": round(time.perf_counter() - t0, 2),
                                              "settings": res.settings})
    for scale in args.scales:
        r = designer.design(target, n, source=source, steps=args.steps, seed=args.seed, objective_scale=scale)
        add(f"design, guidance scale {scale:g}" + (" (unguided: source decoded, condition unset)" if scale == 0 else ""),
            r.expression)
    r = designer.design(target, n, source=source, steps=args.steps, seed=args.seed, resample=True)
    add("design + resampling (SMC)", r.expression, {"settings": r.settings})
    for name, kw in (("design, select=condition", {}),
                     ("design, select=condition, guidance 1, eta 1", {"objective_scale": 1.0, "eta": 1.0}),
                     (KANG_SELECT, KANG_SELECT_KW)):
        r = designer.design(target, n, source=source, steps=args.steps, seed=args.seed,
                            **{"select": "condition", **kw})
        add(name, r.expression, {"settings": r.settings})
    observed_designer = scidiff.InverseDesigner(model, observed=True)
    r = observed_designer.design(target, n, source=source, steps=args.steps, seed=args.seed, retries=2)
    add(OBSERVED_DEFAULTS, r.expression, {"settings": r.settings})
    r = observed_designer.design(target, n, source=source, steps=args.steps, seed=args.seed, **KANG_SELECT_KW)
    add(KANG_OBSERVED, r.expression, {"settings": r.settings})
    r = observed_designer.design(target, n, source=source, steps=args.steps, seed=args.seed, **KANG_SELECT_KW,
                                 **FREE_KW)
    add(KANG_OBSERVED + FREE, r.expression, {"settings": r.settings})
    direct = direct_gradient_baseline(designer, target, res.source)
    add("direct gradient on expression", direct)
    stim_cd4 = {"cell_type": "CD4T", "condition": "stimulated"}
    for observed in (False, True):
        what = "observed " if observed else ""
        add(f"{what}model samples CD4T|stimulated",
            model.sample(n, stim_cd4, steps=args.steps, seed=args.seed, observed=observed).numpy())
        add(f"{what}model samples CD4T|stimulated meeting the target (rejection)", meeting(
            lambda k, seed: model.sample(k, stim_cd4, steps=args.steps, seed=seed, observed=observed).numpy(),
            hits, n, args.seed))
    priors = {"from the source population (CD4T, control)": {"cell_type": "CD4T", "condition": "control"},
              "from the design's prior (CD4T, condition unset)": {"cell_type": "CD4T"}}
    for observed in (False, True):
        out["observed rejection" if observed else "rejection"] = {
            k: rejection_baseline(model, hits, args.rejection_samples, c, steps=args.steps, seed=args.seed,
                                  observed=observed) for k, c in priors.items()}
    for name in ("design", KANG_SELECT, KANG_OBSERVED, KANG_OBSERVED + FREE):
        rejection = out["observed rejection" if name.startswith("observed") else "rejection"]
        for k, v in rejection.items():
            ratio = against_rejection(out["methods"][name], v, args.steps)
            out["methods"][name][f"vs rejection {k}"] = ratio
            print(f"{name} vs rejection {k} (hit rate {v['hit_rate']:.4f}): {ratio['fewer_samples']:.1f}x fewer "
                  f"samples, {ratio['fewer_sampler_steps']:.1f}x fewer sampler steps per hit"
                  + (" (lower bounds: no hit)" if v["hits"] == 0 else ""), flush=True)
    screen = screen_perturbations(designer, target, source, n_cells=min(n, 256), steps=args.steps, seed=args.seed)
    out["screen"] = screen.to_dict("records")
    print("screen:", screen[["rank", "condition", "fraction_met"]].to_dict("records"), flush=True)
    genes_rank = gene_attribution(designer, target, res.source, res.expression)
    out["gene_attribution_top20"] = genes_rank.head(20)[["gene", "attribution", "mean_change"]].to_dict("records")
    out["gene_attribution_totals"] = dict(genes_rank.attrs)
    print("genes:", list(genes_rank["gene"][:20]), flush=True)
    out["goal"], out["over_seeds"] = {}, {}
    seeds = [args.seed + i for i in range(args.repeats)]
    for name, kw, who in (("design", {}, designer), (KANG_SELECT, KANG_SELECT_KW, designer),
                          (KANG_OBSERVED, KANG_SELECT_KW, observed_designer)):
        s = out["methods"][name]
        rep = out["over_seeds"][name] = over_seeds(
            s, lambda seed: who.design(target, n, source=source, steps=args.steps, seed=seed, **kw),
            lambda x: score(x, real, labels, [stim_label], hits, args.seed), stim_label, seeds)
        print(f"{name} over seeds {seeds}: met {rep['mean_fraction_met_all']:.3f} AUC {rep['mean_classifier_auc']:.3f}",
              flush=True)
        out["goal"][name] = {
            "fraction_met_all>=0.90 (mean over seeds)": rep["mean_fraction_met_all"] >= 0.90,
            "realism_auc_vs_stimulated<=0.70 (mean over seeds)": rep["mean_classifier_auc"] <= 0.70,
            "closer_to_stimulated_than_control_by_e_distance":
                s[f"vs {stim_label}"]["e_distance"] < s[f"vs {ctrl_label}"]["e_distance"],
            "classifier_calls_most_stimulated": s["fraction_classified_stimulated"] > 0.5,
            "screen_ranks_stimulated_first": screen["condition"].iloc[0] == "condition=stimulated",
            ">=10x_fewer_samples_than_rejection (both priors)":
                min(s[f"vs rejection {k}"]["fewer_samples"] for k in out["rejection"]) >= 10.0,
            ">=10x_fewer_samples_than_rejection (source population)":
                s["vs rejection from the source population (CD4T, control)"]["fewer_samples"] >= 10.0}
    results["kang"] = out


def pbmc(args, results):
    import scanpy  # noqa: F401  (the file's origin; its reader is anndata)
    import scidiff
    from scidiff.evaluation.design import direct_gradient_baseline, rejection_baseline

    path = os.path.join(SHARED, "pbmc68k_reduced.h5ad")
    adata = scidiff.data.read_h5ad(path)
    data = scidiff.setup_anndata(adata, use_raw=True, n_top_genes=None, condition_keys=["bulk_labels"])
    model, train_info = train_or_load("pbmc68k", data, args.pbmc_epochs, args.model_dir, args.seed)
    genes = model.data_spec.gene_names
    real = data.log_expression().clip(min=0)
    bulk = adata.obs["bulk_labels"].astype(str).to_numpy()
    labels = np.where(np.char.startswith(bulk.astype(str), "CD8+"), "CD8 T", bulk)
    target = scidiff.PhenotypeTarget(marker_genes={"CD8A": 0.5, "CD8B": 0.5}, suppressed_genes={"CD4": 0.1},
                                     tolerance=0.1)
    hits = hits_fn(target, genes)
    refs = ["CD8 T"]
    designer = scidiff.InverseDesigner(model, observed=False)
    n = args.n
    out = {"target": [str(c) for c in target.constraints], "model": train_info, "methods": {},
           "matching_type": "CD8 T (CD8+ Cytotoxic T and CD8+/CD45RA+ Naive Cytotoxic)"}

    def add(name, cells, extra=None, reals=real, reals_labels=labels):
        s = score(cells, reals, reals_labels, refs, hits, args.seed)
        s["fraction_nearest_CD8_T"] = s["nearest_type_composition"].get("CD8 T", 0.0)
        s.update(extra or {})
        if "settings" in s:
            s["cost"] = cost(s["settings"], s["fraction_met_all"])
        out["methods"][name] = s
        print(line(name, s, refs) + f"  nearest CD8 T {s['fraction_nearest_CD8_T']:.2f}", flush=True)
        return s

    half, rest = split_half(labels, "CD8 T", args.seed)
    add("real CD8 T, held-out half (floor)", real[half], reals=real[rest], reals_labels=labels[rest])
    t0 = time.perf_counter()
    res = designer.design(target, n, steps=args.steps, seed=args.seed)
    add("design", res.expression, {"seconds": round(time.perf_counter() - t0, 2), "settings": res.settings})
    for scale in args.scales:
        r = designer.design(target, n, steps=args.steps, seed=args.seed, objective_scale=scale)
        add(f"design, guidance scale {scale:g}", r.expression)
    for name, kw in (("design, select=bulk_labels", {}),
                     ("design, select=bulk_labels, guidance 1, eta 1, no resampling",
                      {"objective_scale": 1.0, "eta": 1.0, "resample": False}),
                     (PBMC_SELECT, PBMC_SELECT_KW)):
        r = designer.design(target, n, steps=args.steps, seed=args.seed, **{"select": "bulk_labels", **kw})
        add(name, r.expression, {"settings": r.settings})
    observed_designer = scidiff.InverseDesigner(model, observed=True)
    r = observed_designer.design(target, n, steps=args.steps, seed=args.seed, retries=2)
    add(OBSERVED_DEFAULTS, r.expression, {"settings": r.settings})
    for name, kw in ((PBMC_OBSERVED, {}), (PBMC_OBSERVED + FREE, FREE_KW),
                     (PBMC_OBSERVED + ", reweighted measurement", {"reweight_measurement": True})):
        r = observed_designer.design(target, n, steps=args.steps, seed=args.seed, **PBMC_SELECT_KW, **kw)
        add(name, r.expression, {"settings": r.settings})
    unguided = designer.design(target, n, steps=args.steps, seed=args.seed, objective_scale=0.0, resample=False)
    add("unguided (unconditional)", unguided.expression)
    add("direct gradient on expression", direct_gradient_baseline(designer, target, unguided.expression))
    cd8 = [lab for lab in sorted(set(bulk)) if lab.startswith("CD8+")]
    share = np.array([(bulk == lab).sum() for lab in cd8], float)
    per = np.floor(share / share.sum() * n).astype(int)
    per[0] += n - per.sum()
    floor = np.vstack([model.sample(int(k), {"bulk_labels": lab}, steps=args.steps, seed=args.seed + i).numpy()
                       for i, (lab, k) in enumerate(zip(cd8, per))])
    add("model samples of the CD8 labels", floor)
    add("observed model samples of the CD8 labels",
        np.vstack([model.sample(int(k), {"bulk_labels": lab}, steps=args.steps, seed=args.seed + i,
                                observed=True).numpy() for i, (lab, k) in enumerate(zip(cd8, per))]))
    add("model samples of the CD8 labels meeting the target (rejection)", meeting(
        lambda k, seed: model.sample(k, {"bulk_labels": cd8[seed % 2]}, steps=args.steps, seed=seed).numpy(),
        hits, n, args.seed))
    rej = rejection_baseline(model, hits, args.rejection_samples, None, steps=args.steps, seed=args.seed)
    out["rejection"] = {"unconditional": rej}
    out["observed rejection"] = {"unconditional": rejection_baseline(
        model, hits, args.rejection_samples, None, steps=args.steps, seed=args.seed, observed=True)}
    for name in (PBMC_OBSERVED + FREE, PBMC_OBSERVED + ", reweighted measurement"):
        out["methods"][name]["vs rejection"] = against_rejection(out["methods"][name],
                                                                 out["observed rejection"]["unconditional"], args.steps)
    out["goal"], out["over_seeds"] = {}, {}
    seeds = [args.seed + i for i in range(args.repeats)]
    for name, kw, who in (("design", {}, designer), (PBMC_SELECT, PBMC_SELECT_KW, designer),
                          (PBMC_OBSERVED, PBMC_SELECT_KW, observed_designer)):
        s = out["methods"][name]
        rej_name = "observed rejection" if name == PBMC_OBSERVED else "rejection"
        s["vs rejection"] = ratio = against_rejection(s, out[rej_name]["unconditional"], args.steps)
        print(f"{name} vs {rej_name} (hit rate {out[rej_name]['unconditional']['hit_rate']:.4f}): "
              f"{ratio['fewer_samples']:.1f}x fewer samples, {ratio['fewer_sampler_steps']:.1f}x fewer sampler steps "
              f"per hit", flush=True)
        rep = out["over_seeds"][name] = over_seeds(
            s, lambda seed: who.design(target, n, steps=args.steps, seed=seed, **kw),
            lambda x: score(x, real, labels, refs, hits, args.seed), "CD8 T", seeds)
        print(f"{name} over seeds {seeds}: met {rep['mean_fraction_met_all']:.3f} AUC {rep['mean_classifier_auc']:.3f}",
              flush=True)
        out["goal"][name] = {"fraction_met_all>=0.90 (mean over seeds)": rep["mean_fraction_met_all"] >= 0.90,
                             "realism_auc_vs_CD8_T<=0.70 (mean over seeds)": rep["mean_classifier_auc"] <= 0.70,
                             "most_designed_cells_nearest_CD8_T": s["fraction_nearest_CD8_T"] > 0.5,
                             ">=10x_fewer_samples_than_rejection": ratio["fewer_samples"] >= 10.0}
    results["pbmc68k"] = out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kang-epochs", type=int, default=600)
    p.add_argument("--pbmc-epochs", type=int, default=400)
    p.add_argument("--model-dir", default=None, help="load trained models from here if present, else save them there")
    p.add_argument("-n", type=int, default=256, help="designed cells per design")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scales", type=float, nargs="*", default=[0.0, 3.0, 30.0],
                   help="guidance scales of the sweep (beside the default)")
    p.add_argument("--rejection-samples", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=6, help="seeds of the headline designs (goals use their mean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["kang", "pbmc68k"], default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "design.json"))
    args = p.parse_args(argv)
    for f in ("kang_ifnb_pbmc.h5ad", "pbmc68k_reduced.h5ad"):
        if not os.path.exists(os.path.join(SHARED, f)):
            sys.exit(f"missing {os.path.join(SHARED, f)}: this benchmark needs ../shared/data beside the project")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}
    if args.only in (None, "kang"):
        kang(args, results)
    if args.only in (None, "pbmc68k"):
        pbmc(args, results)
    results["setup"] = {"n": args.n, "ddim_steps": args.steps, "seed": args.seed, "threads": args.threads,
                        "scales": args.scales, "rejection_samples": args.rejection_samples, "repeats": args.repeats,
                        "seconds": round(time.perf_counter() - t0, 1), "machine": platform.machine(),
                        "cpu_count": os.cpu_count(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    os.replace(tmp, args.out)
    for name in ("kang", "pbmc68k"):
        if name in results:
            print(name, "goal:", results[name]["goal"])


if __name__ == "__main__":
    main()
