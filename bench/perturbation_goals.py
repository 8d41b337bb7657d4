"""The perturbation suite's goals, checked from its JSONs (``bench/results/perturbation_<task>.json``,
written by ``bench_perturbation.py``): per task, the counterfactual against the best baseline on
RMSE, MAE, Pearson Δ and PDS (the project's metrics, and cell-eval's MAE, Pearson Δ and PDS), each
mean taken over the targets the model predicts (the unseen knockouts: the 9 the prior describes)
and over the baselines that predict all of them; cell-eval's score against the task's reference
baseline; on additive-truth combinations, the RMSE within 5% of the additive baseline's; in new
contexts, every fold's RMSE below no change's. Means are compared as the tables print them
(3 decimals): a tie meets the goal; beside each, the paired difference to that baseline over the
targets with its 95% bootstrap interval (so a loss within the targets' spread shows as one).
Nothing is re-run.

    python bench/perturbation_goals.py [--out bench/results/perturbation_goals.json]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("kang_suite", "zhao", "papalexi_context", "papalexi_seen", "papalexi_unseen", "klein",
         "combos_additive", "combos_saturating")
NEW_CONTEXTS = ("kang_suite", "zhao", "papalexi_context")
MODEL = "scidiff_counterfactual"
BOOTSTRAP = 4000  # resamples of the targets for the paired differences' intervals
# (key, label, lower is better); project metrics per target, then cell-eval's per perturbation
METRICS = (("rmse_all", "RMSE", True), ("mae_all", "MAE", True), ("pearson_delta_all", "Pearson Δ", False),
           ("pds_l1", "PDS", False))
CELL_EVAL = (("mae", "ce MAE", True), ("pearson_delta", "ce Pearson Δ", False),
             ("discrimination_score_l1", "ce PDS", False))


def _targets(result):
    """``[(fold, target, methods)]`` of every target the model predicts."""
    return [(f, t, rec["methods"]) for f, fold in result["folds"].items() for t, rec in fold["targets"].items()
            if "n/a" not in rec["methods"].get(MODEL, {"n/a": True})]


def _cell_eval_row(result, method, fold, target):
    per = result.get("cell_eval", {}).get("per_perturbation", {}).get(method, {})
    return per.get(f"{fold}/{target}", per.get(target))


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(np.mean(values)) if values else None


def paired_interval(model, baseline, draws: int = BOOTSTRAP, seed: int = 0) -> dict | None:
    """The mean of the per-target differences ``model - baseline`` and its 95% bootstrap interval
    over targets (targets where either is missing are left out; ``None`` for fewer than 2)."""
    d = np.array([a - b for a, b in zip(model, baseline) if a is not None and b is not None
                  and not (np.isnan(a) or np.isnan(b))], float)
    if len(d) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (draws, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(lo), "high": float(hi), "targets": len(d)}


def check_task(result) -> dict:
    """The goals of one task's result (module docstring)."""
    targets = _targets(result)
    methods = {m for _, _, ms in targets for m in ms}
    baselines = sorted(m for m in methods if not m.startswith("scidiff_")
                       and all("n/a" not in ms.get(m, {"n/a": True}) for _, _, ms in targets))
    def project(m, key):
        return [ms[m].get(key) for _, _, ms in targets]

    def cell_eval(m, key):
        return [(_cell_eval_row(result, m, f, t) or {}).get(key) for f, t, _ in targets]

    metrics = {}
    for (key, label, lower), values in [(row, project) for row in METRICS] + [(row, cell_eval) for row in CELL_EVAL]:
        model = _mean(values(MODEL, key))
        scores = {m: _mean(values(m, key)) for m in baselines}
        scores = {m: v for m, v in scores.items() if v is not None}
        if model is None or not scores:
            continue
        best = (min if lower else max)(scores, key=scores.get)
        a, b = round(model, 3), round(scores[best], 3)
        metrics[label] = {"model": model, "best_baseline": best, "baseline": scores[best],
                          "met": a <= b if lower else a >= b,
                          "difference": paired_interval(values(MODEL, key), values(best, key))}
    out = {"targets": len(targets), "baselines": baselines, "metrics": metrics}
    score = result.get("cell_eval", {}).get("score_vs_reference", {}).get(MODEL, {}).get("avg_score")
    if score is not None:
        out["cell_eval_score"] = {"vs": result["cell_eval"]["reference"], "score": score, "met": score > 0}
    if "additive" in baselines and result["task"].startswith("combos_additive"):
        rmse = metrics["RMSE"]["model"]
        additive = _mean([ms["additive"]["rmse_all"] for _, _, ms in targets])
        out["within_5pct_of_additive"] = {"model": rmse, "additive": additive, "met": rmse <= 1.05 * additive}
    if result["task"] in NEW_CONTEXTS:
        folds = {}
        for f, _, ms in targets:
            folds.setdefault(f, []).append((ms[MODEL]["rmse_all"], ms["no_change"]["rmse_all"]))
        per = {f: {"model": float(np.mean([a for a, _ in v])), "no_change": float(np.mean([b for _, b in v]))}
               for f, v in folds.items()}
        out["below_no_change"] = {"folds": per, "met": all(v["model"] < v["no_change"] for v in per.values()),
                                  "targets_worse": sum(a > b for v in folds.values() for a, b in v)}
    return out


def markdown(goals: dict) -> str:
    labels = [lab for _, lab, _ in METRICS + CELL_EVAL]
    lines = ["| task | " + " | ".join(labels) + " | cell-eval score | other |", "|---" * (len(labels) + 3) + "|"]
    for task, g in goals.items():
        cells = []
        for lab in labels:
            m = g["metrics"].get(lab)
            if m is None:
                cells.append("-")
                continue
            d = m["difference"]
            interval = "" if d is None else f"; {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            cells.append(f"{'met' if m['met'] else '**lost**'} {m['model']:.3f} "
                         f"({m['best_baseline'].replace('_', ' ')} {m['baseline']:.3f}{interval})")
        s = g.get("cell_eval_score")
        cells.append("-" if s is None else f"{'met' if s['met'] else '**lost**'} {s['score']:.3f}")
        other = []
        if "within_5pct_of_additive" in g:
            w = g["within_5pct_of_additive"]
            other.append(f"RMSE within 5% of additive: {'met' if w['met'] else 'lost'} ({w['model']:.3f} / "
                         f"{w['additive']:.3f})")
        if "below_no_change" in g:
            b = g["below_no_change"]
            other.append(f"every fold below no change: {'met' if b['met'] else 'lost'} "
                         f"({b['targets_worse']} targets above)")
        lines.append(f"| {task} ({g['targets']}) | " + " | ".join(cells) + " | " + "; ".join(other or ["-"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "perturbation_goals.json"))
    args = p.parse_args(argv)
    goals = {}
    for task in TASKS:
        path = os.path.join(args.results, f"perturbation_{task}.json")
        if os.path.exists(path):
            with open(path) as f:
                goals[task] = check_task(json.load(f))
    print(markdown(goals))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(goals, f, indent=1)
    os.replace(tmp, args.out)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
