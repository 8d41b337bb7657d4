"""Perturbation-prediction suite on real data: baselines, the scidiff model, the field's metrics.

Tasks (``bench/perturbation_tasks.py``): ``kang`` (leave one cell type out, 7 folds), ``zhao``
(panobinostat in an unseen patient, 5 folds), ``papalexi_seen`` (a third of each knockout's
cells held out), ``papalexi_unseen`` (each knockout with no data of it, 25 folds),
``papalexi_context`` (each replicate's knockouts held out, 3 folds), ``klein``
(day 4 held out), ``combos_additive`` / ``combos_saturating`` (a synthetic combination screen on
real control cells, one fold per generator seed).

Each fold's targets are predicted by the baselines of ``scidiff.evaluation.perturbation``
(no change, mean shift, cell mean, additive, linear; whichever apply) and, unless ``--no-model``,
by a scidiff model trained on the fold (counterfactual and population;
``scidiff.tasks.perturb.perturb``, whose per-cell ``scidiff_confidence`` is recorded as its mean
per target, ``confidence_mean``, with the cells per ``scidiff_route``). Scores:

- the project's metrics per target (``perturbation_metrics``: RMSE / MAE of the per-gene means,
  Pearson delta, scGen R² on all genes and the top-100 DEGs, MSE top-20, E-distance and MMD in
  30 PCs fitted on the fold's training cells; DEGs by Wilcoxon of the real cells against the
  source controls) and the perturbation discrimination score (PDS, cell-eval's definition, L1)
  among the fold's targets, or across folds where each fold holds one target;
- cell-eval (``scidiff.evaluation.cell_eval``, when installed): its per-perturbation metrics
  and its score of every method against the task's reference baseline.

Means are over targets (fold x perturbation); intervals: 95% bootstrap over the targets, or,
with ``--n-boot N``, over cells within each target and then over targets (as the Kang bench did).
Results to ``bench/results/perturbation_<task>.json`` (data file, folds, seeds, machine); each
finished fold is kept in ``OUT.folds/`` so an interrupted run resumes. A markdown summary is
printed at the end.

    python bench/bench_perturbation.py --tasks zhao,klein --no-model --threads 1
    python bench/bench_perturbation.py --tasks kang --epochs 400 --n-boot 100
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

METRICS = ("rmse_all", "mae_all", "pearson_delta_all", "scgen_r2_all", "scgen_r2_top100", "r2_top50",
           "pearson_delta_top20", "mse_top20", "e_distance", "mmd")
MODEL_METHODS = ("counterfactual", "population")
TABLE = (("rmse_all", "RMSE"), ("mae_all", "MAE"), ("pearson_delta_all", "Pearson Δ"), ("pds_l1", "PDS"),
         ("e_distance", "E-dist"), ("scgen_r2_top100", "R² top100"), ("confidence_mean", "confidence"))
CE_TABLE = (("pearson_delta", "ce Pearson Δ"), ("mae", "ce MAE"), ("discrimination_score_l1", "ce PDS"),
            ("overlap_at_N", "ce overlap@N"), ("precision_at_N", "ce precision@N"),
            ("de_nsig_counts_pred", "ce DE genes"))


def _finite(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _json_safe(o):
    import numpy as np

    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if math.isnan(float(o)) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return _json_safe(o.tolist())
    return o


def cell_bootstrap(pred, true, control, genes, degs, project, seed, n_boot):
    """Per-cell bootstrap of :func:`perturbation_metrics` (predicted, real and control cells resampled)."""
    import numpy as np

    from scidiff.evaluation.perturbation import perturbation_metrics

    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        p = pred[rng.integers(0, len(pred), len(pred))]
        t = true[rng.integers(0, len(true), len(true))]
        c = control[rng.integers(0, len(control), len(control))]
        reps.append(perturbation_metrics(p, t, c, genes, degs, project))
    return {k: np.array([r[k] for r in reps]) for k in METRICS}


def settings(args, task_name) -> dict:
    """What a fold's result depends on: a cached fold is reused only under the same settings."""
    keys = ("epochs", "latent_dim", "hidden_dim", "num_layers", "steps", "n_boot", "seed", "model", "ridge_alpha",
            "cell_eval", "combo_seeds")
    return {"task": task_name, **{k: getattr(args, k) for k in keys}}


def _cell_eval_pair(targets, preds, control):
    """(pred, real) AnnData for cell-eval: every target's cells under its name, plus the control."""
    import anndata as ad
    import pandas as pd

    def frame(x, label):
        a = ad.AnnData(X=x, obs=pd.DataFrame({"perturbation": [label] * len(x)}))
        a.var_names = [str(g) for g in control.var_names]
        return a

    real = ad.concat([frame(t.true.X, t.name) for t in targets] + [frame(control.X, "control")], index_unique="-")
    pred = ad.concat([frame(p, t.name) for t, p in zip(targets, preds)] + [frame(control.X, "control")],
                     index_unique="-")
    return pred, real


def run_cell_eval_for(entries, methods, num_threads=1):
    """cell-eval on a set of (target, control, {method: pred X}) entries sharing one control:
    {method: CellEvalResult}; a method is scored on the targets it has predictions for."""
    from scidiff.evaluation.cell_eval import run_cell_eval

    out = {}
    control = entries[0][1]
    for m in methods:
        have = [(t, preds[m]) for t, _, preds in entries if m in preds]
        if not have:
            continue
        pred, real = _cell_eval_pair([t for t, _ in have], [p for _, p in have], control)
        out[m] = run_cell_eval(pred, real, "perturbation", "control", num_threads=num_threads)
    return out


def model_path(args, task_name, fold_name) -> str | None:
    """Where ``--model-cache`` keeps the fold's trained model, named by what its training reads."""
    if not args.model_cache:
        return None
    keys = ("epochs", "latent_dim", "hidden_dim", "num_layers", "seed", "combo_seeds")
    tag = "_".join(f"{k}{getattr(args, k)}" for k in keys).replace(",", "-")
    os.makedirs(os.path.join(args.model_cache, task_name), exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", fold_name)
    return os.path.join(args.model_cache, task_name, f"{safe}_{tag}.pt")


def run_fold(task, fold, fi, args, genes):
    """Predict and score one fold; returns (record, arrays for the cache, {method: [X | None]})."""
    import numpy as np

    from scidiff.evaluation import fit_pca
    from scidiff.evaluation.perturbation import perturbation_metrics, rank_degs

    t0 = time.perf_counter()
    preds, notes = baseline_preds(task, fold, args)
    timings = {"baselines_s": round(time.perf_counter() - t0, 2)}
    records = {}  # what each model prediction says about itself (confidence, routes), per target
    if args.model and task.model_keys is not None:
        from perturbation_tasks import prediction_record, predict_with_scidiff

        t1 = time.perf_counter()
        res = predict_with_scidiff(fold.train, fold.control, [t.target for t in fold.targets], task.model_keys,
                                   seed=args.seed, epochs=args.epochs, method=MODEL_METHODS,
                                   hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                                   latent_dim=args.latent_dim, steps=args.steps,
                                   model_path=model_path(args, task.name, fold.name))
        for m, lst in res.items():
            preds[f"scidiff_{m}"] = [None if isinstance(p, str) else np.asarray(p[:, genes].X, dtype=np.float32)
                                     for p in lst]
            records[f"scidiff_{m}"] = [None if isinstance(p, str) else prediction_record(p) for p in lst]
            for t, p in zip(fold.targets, lst):
                if isinstance(p, str):
                    notes[f"scidiff_{m}/{t.name}"] = f"refused: {p}"
        trained = [p for p in res[MODEL_METHODS[0]] if not isinstance(p, str)]
        if trained:
            timings["model_train_s"] = round(float(trained[0].uns["train_seconds"]), 1)
        timings["model_total_s"] = round(time.perf_counter() - t1, 1)
    elif args.model:
        notes["scidiff"] = task.model_note
    project = fit_pca(fold.train.X, 30, args.seed)
    control = np.asarray(fold.control.X, dtype=np.float64)
    record = {"n_train": int(fold.train.n_obs), "n_control": int(fold.control.n_obs), "targets": {},
              "notes": notes, "info": _json_safe({k: v for k, v in fold.info.items() if k != "linear_features"})}
    arrays = {"control_mean": control.mean(0)}
    for ti, t in enumerate(fold.targets):
        true = np.asarray(t.true.X, dtype=np.float64)
        degs = rank_degs(true, control, genes, min(100, len(genes)))
        rec = {"n_true": int(len(true)), "target": _json_safe(t.target), "degs_top100": degs, "methods": {}}
        arrays[f"{t.name}/true_mean"] = true.mean(0)
        for m, lst in preds.items():
            if lst[ti] is None:
                rec["methods"][m] = {"n/a": notes.get(f"{m}/{t.name}", "not applicable")}
                continue
            p = np.asarray(lst[ti], dtype=np.float64)
            met = perturbation_metrics(p, true, control, genes, degs, project)
            if m in records:
                met.update(records[m][ti])
            if args.n_boot:
                boots = cell_bootstrap(p, true, control, genes, degs, project, args.seed + fi, args.n_boot)
                met["interval95"] = {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
                                     for k, v in boots.items()}
                for k, v in boots.items():
                    arrays[f"{t.name}/{m}/boot/{k}"] = v
            rec["methods"][m] = met
            arrays[f"{t.name}/{m}/pred_mean"] = p.mean(0)
        record["targets"][t.name] = rec
    if args.cell_eval and not task.shared_control:
        entries = [(t, fold.control, {m: lst[i] for m, lst in preds.items() if lst[i] is not None})
                   for i, t in enumerate(fold.targets)]
        record["cell_eval"] = {m: r.to_dict() for m, r in run_cell_eval_for(entries, list(preds)).items()}
    record["seconds"] = {**timings, "total_s": round(time.perf_counter() - t0, 1)}
    return record, arrays, preds


def pds_scores(task, folds_rec, means, genes, methods):
    """PDS (L1, cell-eval's definition) per method and target: among the fold's targets where a
    fold holds several (with one shared control), else among all folds' targets, each effect taken
    against its own fold's control."""
    import numpy as np

    from scidiff.evaluation.perturbation import discrimination_score

    groups = []
    if task.shared_control or all(len(f.targets) == 1 for f in task.folds):
        groups.append([(f.name, t.name) for f in task.folds for t in f.targets])
    else:
        groups += [[(f.name, t.name) for t in f.targets] for f in task.folds]
    out = {m: {} for m in methods}
    for entries in groups:
        if len(entries) < 2:
            continue
        real = np.stack([means[f][f"{t}/true_mean"] - means[f]["control_mean"] for f, t in entries])
        for m in methods:
            have = [(i, f, t) for i, (f, t) in enumerate(entries) if f"{t}/{m}/pred_mean" in means[f]]
            if not have:
                continue
            pred = np.stack([means[f][f"{t}/{m}/pred_mean"] - means[f]["control_mean"] for _, f, t in have])
            excl = [[genes.index(t)] if t in genes else None for _, _, t in have]
            scores = discrimination_score(pred, real, "l1", exclude=excl, true_index=[i for i, _, _ in have])
            for (_, f, t), s in zip(have, scores):
                out[m][f"{f}/{t}"] = float(s)
    return out


def summarise(task, folds_rec, pds, methods, n_boot, boots, seed):
    """Mean over targets per method and metric, with a 95% interval (bootstrap over targets, or
    over cells then targets with --n-boot)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    summary = {}
    for m in methods:
        rows = [(f, t, rec["methods"][m]) for f, fr in folds_rec.items() for t, rec in fr["targets"].items()
                if m in rec["methods"] and "n/a" not in rec["methods"][m]]
        if not rows:
            summary[m] = {"n_targets": 0}
            continue
        s = {"n_targets": len(rows)}
        for k in METRICS + ("pds_l1", "confidence_mean"):
            if k == "pds_l1":
                vals = np.array([pds.get(m, {}).get(f"{f}/{t}", np.nan) for f, t, _ in rows], float)
            else:
                vals = np.array([np.nan if r.get(k) is None else r[k] for _, _, r in rows], float)
            vals = vals[np.isfinite(vals)]
            if not len(vals):
                continue
            entry = {"mean": float(vals.mean()), "n": int(len(vals))}
            if n_boot and k in METRICS and m in boots:
                stack = np.stack([boots[m][(f, t)][k] for f, t, _ in rows])
                bm = np.nanmean(stack, axis=0)
                entry["ci95"], entry["ci95_over"] = [float(np.nanpercentile(bm, 2.5)),
                                                     float(np.nanpercentile(bm, 97.5))], "cells, then targets"
            elif len(vals) > 1:
                bm = vals[rng.integers(0, len(vals), (1000, len(vals)))].mean(1)
                entry["ci95"], entry["ci95_over"] = [float(np.percentile(bm, 2.5)),
                                                     float(np.percentile(bm, 97.5))], "targets"
            s[k] = entry
        summary[m] = s
    return summary


def readme_check(task_name, summary):
    from perturbation_tasks import README_FIGURES

    out = {}
    for m, figs in README_FIGURES.get(task_name, {}).items():
        for k, expected in figs.items():
            got = summary.get(m, {}).get(k, {}).get("mean")
            out[f"{m}/{k}"] = {"readme": expected, "measured": got,
                               "reproduced_within_0.005": got is not None and abs(got - expected) <= 0.005}
    return out


def markdown(task, result) -> str:
    s, ce = result["summary"], result.get("cell_eval", {})
    head = ["method", "n"] + [h for _, h in TABLE] + ([h for _, h in CE_TABLE] + ["ce score vs " + task.reference]
                                                      if ce else [])
    lines = [f"### {task.name}: {task.description}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for m, row in s.items():
        if not row.get("n_targets"):
            continue
        cells = [m, str(row["n_targets"])] + [fmt(row.get(k, {}).get("mean")) for k, _ in TABLE]
        if ce:
            mean = ce.get("mean", {}).get(m, {})
            cells += [fmt(mean.get(k)) for k, _ in CE_TABLE]
            cells.append(fmt(ce.get("score_vs_reference", {}).get(m, {}).get("avg_score")))
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("model_not_applicable"):
        lines += ["", f"scidiff: not run, {result['model_not_applicable']}."]
    check = result.get("readme_check")
    if check:
        lines.append("")
        lines.append("README figures: " + "; ".join(
            f"{k} {v['readme']:.3f} -> {fmt(v['measured'])} ({'ok' if v['reproduced_within_0.005'] else 'DIFFERS'})"
            for k, v in check.items()))
    return "\n".join(lines)


def run_task(name, args):
    import numpy as np
    import torch

    import machine_info
    from perturbation_tasks import build_task

    t_start = time.perf_counter()
    task = build_task(name, data_dir=args.data_dir, seed=args.seed,
                      combo_seeds=tuple(int(s) for s in args.combo_seeds.split(",")))
    genes = [str(g) for g in task.folds[0].train.var_names]
    out_path = os.path.join(args.out_dir, f"perturbation_{name}{args.tag}.json")
    fold_dir = out_path + ".folds"
    os.makedirs(fold_dir, exist_ok=True)
    folds_rec, means, boots, ce_entries = {}, {}, {}, []
    want = set(args.folds.split(",")) if args.folds else None
    for fi, fold in enumerate(task.folds):
        if want and fold.name not in want:
            continue
        cache = os.path.join(fold_dir, f"{fold.name}.npz")
        rec = None
        if os.path.exists(cache):
            with np.load(cache, allow_pickle=False) as z:
                saved = json.loads(str(z["record"]))
                if saved["settings"] == settings(args, name):
                    rec, arrays = saved["fold"], {k: z[k] for k in z.files if k != "record"}
                    print(f"[{name}] {fold.name:14s} loaded from {cache}", flush=True)
        if rec is None:
            rec, arrays, preds = run_fold(task, fold, fi, args, genes)
            tmp = cache + ".tmp.npz"
            np.savez(tmp, record=json.dumps(_json_safe({"settings": settings(args, name), "fold": rec})), **arrays)
            os.replace(tmp, cache)
            rec = json.loads(json.dumps(_json_safe(rec)))
            rmses = {m: [r["methods"][m]["rmse_all"] for r in rec["targets"].values()
                         if "rmse_all" in r["methods"].get(m, {})] for m in preds}
            line = "  ".join(f"{m}: rmse {np.mean(v) if v else float('nan'):.3f}" for m, v in rmses.items())
            print(f"[{name}] {fold.name:14s} {rec['seconds']['total_s']:7.1f}s  {line}", flush=True)
        else:
            preds = None
        if args.cell_eval and task.shared_control:
            if preds is None:  # a cached fold: the task-wide cell-eval needs its predictions again
                if args.model and task.model_keys is not None:
                    raise RuntimeError("a shared-control task with a model cannot resume from cached folds: the "
                                       "model's predictions are not kept")
                preds, _ = baseline_preds(task, fold, args)
            ce_entries += [(t, fold.control, {m: lst[i] for m, lst in preds.items() if lst[i] is not None})
                           for i, t in enumerate(fold.targets)]
        folds_rec[fold.name] = rec
        means[fold.name] = arrays
        for t in rec["targets"]:
            for m in rec["targets"][t]["methods"]:
                ks = [k for k in arrays if k.startswith(f"{t}/{m}/boot/")]
                if ks:
                    boots.setdefault(m, {})[(fold.name, t)] = {k.rsplit("/", 1)[1]: arrays[k] for k in ks}
    methods = list(dict.fromkeys(m for fr in folds_rec.values() for r in fr["targets"].values() for m in r["methods"]))
    done = [f for f in task.folds if f.name in folds_rec]
    task_view = type(task)(**{**task.__dict__, "folds": done})
    pds = pds_scores(task_view, folds_rec, means, genes, methods)
    result = {"task": name, "description": task.description, "data": task.data, "info": task.info,
              "model_not_applicable": task.model_note if args.model and task.model_keys is None else None,
              "folds": {}, "summary": summarise(task_view, folds_rec, pds, methods, args.n_boot, boots, args.seed)}
    for f, fr in folds_rec.items():
        for t, r in fr["targets"].items():
            for m in r["methods"]:
                if f"{f}/{t}" in pds.get(m, {}):
                    r["methods"][m]["pds_l1"] = pds[m][f"{f}/{t}"]
        result["folds"][f] = fr
    if args.cell_eval:
        from scidiff.evaluation.cell_eval import CellEvalResult, cell_eval_score

        if task.shared_control:
            per_method = run_cell_eval_for(ce_entries, methods) if ce_entries else {}
        else:
            per_method = {}
            for m in methods:
                parts = {f: CellEvalResult(**fr["cell_eval"][m]) for f, fr in folds_rec.items()
                         if m in fr.get("cell_eval", {})}
                if parts:
                    per_method[m] = CellEvalResult.concat(parts)
        ref = per_method.get(task.reference)
        scores = {}
        for m, r in per_method.items():
            if ref is None:
                break
            # scored on the perturbations both predict (the linear baseline of papalexi_unseen covers 9 of 25)
            common = sorted(set(r.per_perturbation) & set(ref.per_perturbation))
            a = CellEvalResult({q: r.per_perturbation[q] for q in common}, r.mean)
            b = CellEvalResult({q: ref.per_perturbation[q] for q in common}, ref.mean)
            scores[m] = {**cell_eval_score(a, b), "n_perturbations": len(common)}
        result["cell_eval"] = {"reference": task.reference, "mean": {m: r.mean for m, r in per_method.items()},
                               "n_perturbations": {m: len(r.per_perturbation) for m, r in per_method.items()},
                               "score_vs_reference": scores,
                               "per_perturbation": {m: r.per_perturbation for m, r in per_method.items()},
                               "info": {m: r.info for m, r in per_method.items()}}
    if len(done) == len(task.folds):  # the README's figures are means over all folds
        result["readme_check"] = readme_check(name, result["summary"])
    if name == "kang" and "scidiff_counterfactual" in result["summary"]:
        best, ms = result["summary"]["scidiff_counterfactual"], result["summary"]["mean_shift"]
        result["goal"] = {"pearson_delta_all>=0.88": best["pearson_delta_all"]["mean"] >= 0.88,
                          "scgen_r2_top100>=0.92": best["scgen_r2_top100"]["mean"] >= 0.92,
                          "e_distance<mean_shift": best["e_distance"]["mean"] < ms["e_distance"]["mean"]}
    try:
        from importlib.metadata import version
        ce_version = version("cell-eval")
    except Exception:  # noqa: BLE001 - not installed
        ce_version = "not installed"
    result["setup"] = {"data": task.data, "folds": [f.name for f in done], "seed": args.seed,
                       "combo_seeds": args.combo_seeds if name.startswith("combos") else None,
                       "model": bool(args.model and task.model_keys is not None),
                       "model_settings": {"epochs": args.epochs, "latent_dim": args.latent_dim,
                                          "hidden_dim": args.hidden_dim, "num_layers": args.num_layers,
                                          "ddim_steps": args.steps} if args.model else None,
                       "ridge_alpha": args.ridge_alpha, "n_boot": args.n_boot, "threads": args.threads,
                       "normalisation": "normalize_total 1e4 + log1p (Kang: X as shipped, log1p-normalised)",
                       "seconds": round(time.perf_counter() - t_start, 1),
                       "machine": machine_info.machine(torch=torch.__version__, cell_eval=ce_version)}
    os.makedirs(args.out_dir, exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_json_safe(result), fh, indent=1)
    os.replace(tmp, out_path)
    return task, result


def baseline_preds(task, fold, args):
    """Every baseline's prediction (X, or None where it does not apply) of every target of the
    fold, and why not where not: ``({method: [X | None]}, {"method/target": reason})``."""
    from scidiff.evaluation.perturbation import predict_baseline

    preds, notes = {}, {}
    for name, kw in task.baselines.items():
        kw = dict(kw)
        if kw.get("features") == "fold":
            kw["features"] = fold.info["linear_features"]
        if name == "linear" and "time_key" not in kw:
            kw.setdefault("alpha", args.ridge_alpha)
        out = []
        for t in fold.targets:
            try:
                out.append(predict_baseline(name, fold.train, fold.control, t.target, **kw).X)
            except ValueError as err:
                out.append(None)
                notes[f"{name}/{t.name}"] = str(err)
        preds[name] = out
    return preds, notes


def main(argv=None):
    from perturbation_tasks import DATA_DIR, TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--no-model", dest="model", action="store_false", help="baselines only")
    p.add_argument("--no-cell-eval", dest="cell_eval", action="store_false")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ridge-alpha", type=lambda t: None if t == "cv" else float(t), default=None,
                   help="the linear baseline's ridge penalty (default cv: leave-one-group-out cross-validation)")
    p.add_argument("--n-boot", type=int, default=0, help="per-cell bootstrap resamples per target (0: over targets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combo-seeds", default="0,1,2", help="generator seeds of the synthetic screens (one fold each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--folds", default=None, help="comma-separated fold names (default: all)")
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--model-cache", default=None,
                   help="folder where each fold's trained model is kept and reused (prediction-side changes "
                        "only: a kept model is read whatever the training code)")
    p.add_argument("--tag", default="", help="suffix of the result files: perturbation_<task><tag>.json")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        sys.exit(f"unknown tasks {unknown}; tasks: {', '.join(TASKS)}")
    if not os.path.isdir(args.data_dir):
        sys.exit(f"missing {args.data_dir}: this benchmark needs ../shared/data beside the project")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.cell_eval:
        try:
            import cell_eval  # noqa: F401
        except ImportError:
            print("cell-eval not installed (pip install 'scidiff[celleval]'): its scores are skipped", flush=True)
            args.cell_eval = False
    reports = []
    for name in tasks:
        task, result = run_task(name, args)
        reports.append(markdown(task, result))
        print(f"[{name}] done in {result['setup']['seconds']:.0f}s -> "
              f"{os.path.join(args.out_dir, f'perturbation_{name}{args.tag}.json')}", flush=True)
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
