"""``scidiff evaluate``: generated cells scored against real ones (metrics.json and plots), or,
with ``--perturbation``, predicted perturbation responses against the real perturbed cells."""
from __future__ import annotations

import json
import os
import sys
import warnings

from .common import SEPARATOR_HELP, add_expression_source, check_out, positive_int, separator_text, split


def add(sub):
    p = sub.add_parser("evaluate", help="score generated cells, or predicted perturbation responses, against real ones",
                       description="Write metrics.json (and PNG plots) comparing generated to real cells. With "
                                   "--perturbation: score predicted perturbation responses (--predicted, e.g. "
                                   "scidiff predict's output) against the real perturbed cells of --real per "
                                   "perturbation (RMSE, MAE, Pearson delta, PDS, E-distance, ...), the same for each "
                                   "--baseline, and, where cell-eval is installed, cell-eval's metrics and its score "
                                   "of the prediction against each baseline.")
    p.add_argument("--real", required=True, help="real cells (.h5ad); with --perturbation: perturbed and control cells")
    add_expression_source(p, "--real")
    p.add_argument("--generated", default=None, help="generated cells (.h5ad)")
    p.add_argument("--groupby", default=None, help="obs key present in both files, e.g. cell_type")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--auc-repeats", type=positive_int, default=1,
                   help="draws of the classifier AUC to average (default 1; one draw over tens of cells a group "
                        "is noisy)")
    g = p.add_argument_group("perturbation predictions (--perturbation)")
    g.add_argument("--perturbation", action="store_true", help="score predicted perturbation responses")
    g.add_argument("--predicted", default=None, help="predicted cells (.h5ad; --generated works too)")
    g.add_argument("--perturbation-key", default=None, help="obs column of the perturbation in both files")
    g.add_argument("--control-label", default="control,ctrl",
                   help="label of the real control cells, or several, comma-separated (default: control,ctrl, "
                        "every one taken as control)")
    g.add_argument("--separator", type=separator_text, default="+", help=SEPARATOR_HELP)
    g.add_argument("--context-key", default=None, help="obs column of the context (cell type, patient) in both files")
    g.add_argument("--dose-key", default=None,
                   help="numeric obs column of the dose in both files: each perturbation at each dose is a group "
                        "(A @ 10), its control cells those of its context")
    g.add_argument("--baseline", action="append", default=None, metavar="NAME=FILE",
                   help="a baseline's predictions of the same perturbations (repeatable), e.g. "
                        "mean-shift=ms.h5ad (scidiff predict --method mean-shift)")
    g.add_argument("--min-de-genes", type=positive_int, default=10,
                   help="cell-eval's DE overlap is reported where the real cells have at least this many "
                        "significant DE genes")


def _baselines(items) -> dict:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--baseline {item!r}: write NAME=FILE, e.g. mean-shift=ms.h5ad")
        if name.strip() in out:
            raise ValueError(f"--baseline {name.strip()!r} is given twice")
        out[name.strip()] = path.strip()
    return out


def run(args):
    if args.perturbation:
        return _run_perturbation(args)
    given = [f for f, v in (("--predicted", args.predicted), ("--perturbation-key", args.perturbation_key),
                            ("--context-key", args.context_key), ("--dose-key", args.dose_key),
                            ("--baseline", args.baseline)) if v]
    if given:
        raise ValueError(f"{', '.join(given)} score perturbation predictions: add --perturbation")
    if args.generated is None:
        raise ValueError("--generated is required (the generated cells); or score perturbation predictions with "
                         "--perturbation --predicted FILE")
    from ..tasks.evaluate import evaluate_files  # lazy: keeps --help light (torch, anndata)

    check_out(args.out, folder=True)
    metrics = evaluate_files(args.real, args.generated, args.out, args.groupby, plots=not args.no_plots,
                             auc_repeats=args.auc_repeats, layer=args.layer, use_raw=args.use_raw)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1, default=float))
    _warn_skipped(args.groupby, metrics)
    print(_inputs_line(metrics.get("inputs") or {}, "generated"))
    print("measured properties, KS against the real cells (0 = the same distribution): "
          + ", ".join(f"{k} {v:.3f}" for k, v in metrics["measurement"].items()))


def _inputs_line(inputs: dict, other: str) -> str:
    """What each file's ``X`` was read as: counts are normalised and log1p'd, log1p taken as is."""
    target = inputs.get("target_sum", 1e4)
    said = {"counts": f"counts (normalised to {target:g} per cell, then log1p)", "log1p": "log1p (taken as is)"}
    parts = [f"{name} {said.get(kind, kind)}" for name, kind in inputs.items() if name != "target_sum"]
    return "X read as: " + "; ".join(parts) if parts else f"X of the real and {other} cells read as log1p or counts"


def _warn_skipped(groupby, metrics: dict):
    """Say which generated groups of ``--groupby`` have no per-group scores, and why."""
    skipped = metrics.get("per_cell_type_skipped") or {}
    if not skipped:
        return
    items = list(skipped.items())
    listed = "; ".join(f"{label!r}: {why}" for label, why in items[:10])
    more = f"; and {len(items) - 10} more (metrics.json lists them)" if len(items) > 10 else ""
    scored = len(metrics.get("per_cell_type") or {})
    warnings.warn(f"--groupby {groupby}: {len(items)} group(s) of the generated cells have no per-group scores "
                  f"({scored} scored): {listed}{more}", stacklevel=2)


def _run_perturbation(args):
    if args.predicted and args.generated and args.predicted != args.generated:
        raise ValueError("give the prediction once: --predicted or --generated, not both")
    predicted = args.predicted or args.generated
    if predicted is None:
        raise ValueError("--perturbation needs --predicted PRED.h5ad (the predicted cells)")
    if not args.perturbation_key:
        raise ValueError("--perturbation needs --perturbation-key (the obs column of the perturbation in both files)")
    if args.groupby:
        raise ValueError("--groupby scores generated cells; with --perturbation give --context-key")
    baselines = _baselines(args.baseline)
    from ..tasks.evaluate import CELL_EVAL_MISSING, evaluate_perturbation  # lazy: keeps --help light (torch, anndata)

    check_out(args.out, folder=True)
    controls = split(args.control_label)
    if not controls:
        raise ValueError("--control-label is empty; give the label of the real control cells")
    result = evaluate_perturbation(args.real, predicted, args.perturbation_key, controls, separator=args.separator,
                                   context_key=args.context_key, dose_key=args.dose_key, baselines=baselines,
                                   out_dir=args.out, min_de_genes=args.min_de_genes, layer=args.layer,
                                   use_raw=args.use_raw)
    summary = {"groups": result["n_groups"], "skipped": len(result["skipped"]),
               "not predicted": len(result["not_predicted"]), "prediction": result["mean"],
               **{f"baseline {n}": b["mean"] for n, b in result["baselines"].items()}}
    ce = result["cell_eval"]
    if ce.get("installed"):
        summary["cell-eval"] = ce["prediction"]["mean"]
        summary.update({f"cell-eval score vs {n}": s.get("avg_score") for n, s in ce["score"].items()})
    print(json.dumps(summary, indent=1, default=float))
    print(_inputs_line(result.get("inputs") or {}, "predicted"))
    if ce.get("installed") is False:
        print(f"scidiff evaluate: warning: {CELL_EVAL_MISSING}", file=sys.stderr)  # stdout: the results alone
    print(f"wrote {os.path.join(args.out, 'metrics.json')}")
