"""``scidiff design``: cells designed toward a target phenotype, a report and rankings of what drives it
(the job is :func:`scidiff.tasks.design.run_design`)."""
from __future__ import annotations

import argparse

from .common import (check_out, finite_float, nonnegative_float, nonnegative_int, parse_conditioning,
                     parse_conditions, positive_int, seed_value)


def add(sub) -> None:
    p = sub.add_parser("design", help="design cells toward a target phenotype and rank what drives it",
                       description="Guide sampling toward target gene levels (and a cell type), then write the "
                                   "designed cells, a report (JSON + PNG) and rankings: perturbation conditions "
                                   "(in-silico screen), genes (integrated gradients) and TFs (--tf-network).")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--target", required=True,
                   help="comma-separated GENE>=v (up), GENE<=v (down), GENE=v (level), log1p-normalised, "
                        "e.g. 'IL2RA>=5,FOXP3>=4,CD8A<=0.1'")
    p.add_argument("--cell-type", default=None, help="target cell type: a label of the model's covariates "
                                                     "(conditioned on) and/or of --cell-type-key in --data "
                                                     "(scored by a classifier trained on those cells)")
    p.add_argument("--cell-type-key", default=None, help="obs key holding cell types (default: found by label)")
    p.add_argument("--tf-network", default=None, help="TSV of TF -> target edges: columns source, target, weight "
                                                        "(or no header, those three first)")
    p.add_argument("-n", type=positive_int, default=256, help="cells to design")
    p.add_argument("--data", default=None, help="real cells (.h5ad): realism in the report, the cell-type "
                                                "classifier and the source cells")
    p.add_argument("--source", default=None, help="key=value[,key=value] picking the cells of --data to start "
                                                  "from (default: start from noise)")
    p.add_argument("--condition", default=None, help="key=value[,key=value] to decode under (default: the "
                                                     "source cells' covariates, perturbations at null)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--objective-scale", type=finite_float, default=10.0,
                   help="strength of the pull toward the target: the tilt exp(-scale * loss) the gradient follows "
                        "(formerly --guidance)")
    p.add_argument("--backward-steps", type=nonnegative_int, default=0,
                   help="gradient steps on the clean estimate per step")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale on the condition (default 1), as in every command")
    p.add_argument("--cfg", dest="guidance", type=finite_float, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--eta", type=nonnegative_float, default=None, help="sampler noise (0 deterministic, 1 ancestral; default "
                                                           "0 from source cells, 1 with resampling from noise)")
    p.add_argument("--select", default=None, help="a covariate (cell type, perturbation) whose value is drawn per "
                                                   "cell from its posterior given the target (a screen)")
    p.add_argument("--screen-cells", type=positive_int, default=128,
                   help="--select: unguided cells per value in the screen that scores each value (default 128)")
    p.add_argument("--retries", type=nonnegative_int, default=2, help="restart cells that miss the target up to this many "
                                                          "times from 70%% noise (default 2; 0 keeps the first draw)")
    measured = p.add_mutually_exclusive_group()
    measured.add_argument("--observed", action="store_true", help="design measured cells: sparse, with the data's "
                          "detection rates (the default where the model has a fitted detection model; guidance acts "
                          "on the smooth expression)")
    measured.add_argument("--smooth", action="store_true", help="design each cell's smooth expression instead")
    p.add_argument("--free-measurement", action="store_true", help="measured cells: measure the target genes "
                   "unconditioned (default: conditioned on meeting their targets)")
    p.add_argument("--tolerance", type=nonnegative_float, default=0.1,
                   help="slack when checking a target (log1p units)")
    p.add_argument("--realism", type=nonnegative_float, default=0.0,
                   help="weight of the realism (denoiser score) term")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--no-screen", action="store_true", help="skip the perturbation screen")
    p.add_argument("--out", required=True, help="output .h5ad; the report and rankings are written beside it")


def run(args) -> None:
    from ..tasks.design.job import output_paths, run_design  # lazy: keeps --help light (torch, anndata)
    from ..training.checkpoint import load_model  # lazy: as above

    check_out(output_paths(args.out)["cells"])
    model = load_model(args.model)
    report = run_design(model, args.target, args.out, data=args.data, source=parse_conditions(args.source) or None,
                        condition=parse_conditioning(model, args.condition, "--condition") or None,
                        cell_type=args.cell_type, cell_type_key=args.cell_type_key, tf_network=args.tf_network,
                        n=args.n, steps=args.steps, objective_scale=args.objective_scale,
                        backward_steps=args.backward_steps, guidance_scale=args.guidance, tolerance=args.tolerance,
                        realism_weight=args.realism, eta=args.eta,
                        select=args.select, screen_cells=args.screen_cells, retries=args.retries,
                        observed=True if args.observed else False if args.smooth else None,
                        condition_measurement=not args.free_measurement, seed=args.seed, screen=not args.no_screen)
    kind = "measured" if report["settings"].get("observed") else "smooth"
    line = f"designed {report['n_designed']} {kind} cells; all targets met by {report['fraction_met_all']:.1%}"
    if "realism" in report:
        r = report["realism"]
        line += f"; nearest real type {r['nearest_type']!r} (classifier AUC {r['classifier_auc']:.2f})"
    print(line)
    for key, path in report["files"].items():
        print(f"  {key}: {path}")
