"""``scidiff`` command line: train, sample, evaluate, demo, export-onnx, serve."""
from __future__ import annotations

import argparse
import sys

from .export.commands import add_export_onnx, add_serve, cmd_export_onnx, cmd_serve


def _add_train(sub):
    p = sub.add_parser("train", help="train a model on an .h5ad file",
                       description="Train a conditional diffusion model on an .h5ad file and write RUN_DIR/model.pt.")
    p.add_argument("--data", required=True, help="input .h5ad (raw counts or log-normalised)")
    p.add_argument("--out", required=True, help="run folder for model.pt, config.yaml, history.csv")
    p.add_argument("--condition-keys", default=None,
                   help="comma-separated obs keys to condition on, e.g. cell_type,condition")
    p.add_argument("--config", default=None, help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="override training.num_epochs")
    p.add_argument("--layer", default=None, help="read expression from this layer instead of X")
    p.add_argument("--use-raw", action="store_true", help="read expression from .raw")
    p.add_argument("--n-genes", type=int, default=None, help="number of highly variable genes (model.gene_dim)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--perturbation-keys", default=None,
                   help="comma-separated condition keys that are perturbations (A+B = combination)")
    p.add_argument("--dose-key", default=None, help="numeric obs column with the perturbation dose")
    p.add_argument("--control-labels", default=None, help="comma-separated labels meaning no perturbation")
    p.add_argument("--streaming", action="store_true",
                   help="stream batches from the file on disk instead of loading X (files larger than memory)")


def _add_sample(sub):
    p = sub.add_parser("sample", help="generate cells from a trained model",
                       description="Generate cells; the output .h5ad has the model's genes as var_names "
                                   "and the conditions in obs.")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("-n", type=int, required=True, help="cells per condition")
    p.add_argument("--condition", action="append", default=None,
                   help="key=value[,key=value]; repeat the flag for several groups")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m", "euler_maruyama", "heun"],
                   help="ddim/ddpm; dpmpp_2m (DPM-Solver++ 2M), heun (probability-flow ODE, 2 evaluations a step), "
                        "euler_maruyama (reverse SDE)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output .h5ad")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="score generated cells against real ones",
                       description="Write metrics.json and PNG plots comparing generated to real cells.")
    p.add_argument("--real", required=True)
    p.add_argument("--generated", required=True)
    p.add_argument("--groupby", default=None, help="obs key present in both files, e.g. cell_type")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-plots", action="store_true")


def _add_demo(sub):
    p = sub.add_parser("demo", help="train, sample and evaluate on PBMCs bundled with scanpy",
                       description="Train on scanpy's pbmc68k_reduced conditioned on bulk_labels, generate "
                                   "every cell type, evaluate and write a report (about 5 minutes on 2 cores).")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)


def _add_predict(sub):
    p = sub.add_parser("predict", help="predict perturbation responses of control cells",
                       description="Map each control cell to its predicted perturbed state (DDIM inversion under "
                                   "its own condition, decoding under the target) and write an .h5ad that pairs "
                                   "every input cell with its prediction (X = predicted, layers['control'] = input).")
    p.add_argument("--model", required=True, help="run folder or model.pt")
    p.add_argument("--data", required=True, help="control cells (.h5ad)")
    p.add_argument("--target", required=True, help="key=value[,key=value], e.g. condition=stimulated or drug=A+B,dose=10")
    p.add_argument("--method", default="counterfactual", choices=["counterfactual", "population"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="scidiff", description="Score-based diffusion for single-cell expression.")
    parser.add_argument("--version", action="version", version=f"scidiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_sample, _add_evaluate, _add_predict, _add_demo, add_export_onnx, add_serve):
        add(sub)
    return parser


def _split(text):
    return [k.strip() for k in text.split(",") if k.strip()] if text is not None else None


def cmd_train(args):
    from . import pipeline
    from .config import load_config

    overrides = {"model": {"gene_dim": args.n_genes},
                 "training": {"batch_size": args.batch_size, "seed": args.seed},
                 "data": {"layer": args.layer, "use_raw": True if args.use_raw else None,
                          "perturbation_keys": _split(args.perturbation_keys), "dose_key": args.dose_key,
                          "control_labels": _split(args.control_labels)}}
    config = load_config(args.config, overrides)
    keys = _split(args.condition_keys)
    if keys is not None and config.data.perturbation_keys:
        keys = list(dict.fromkeys(keys + config.data.perturbation_keys))
    pipeline.train(args.data, args.out, config, condition_keys=keys, epochs=args.epochs, device=args.device,
                   streaming=args.streaming)
    print(f"model written to {args.out}")


def cmd_sample(args):
    from . import pipeline
    from .training import load_model

    model = load_model(args.model, map_location=args.device)
    groups = [pipeline.parse_conditions(c) for c in (args.condition or [None])]
    for g in groups:  # fail on a bad label before generating anything
        model.data_spec.encode_conditions(g, 1)
    # written chunk by chunk (bounded memory, progress bar); the file appears when complete
    cells, genes = pipeline.generate_to_file(model, args.n, args.out, groups, sampler=args.sampler, steps=args.steps,
                                             eta=args.eta, guidance_scale=args.guidance, seed=args.seed)
    print(f"wrote {cells} cells x {genes} genes to {args.out}")


def cmd_evaluate(args):
    import json

    from . import pipeline

    metrics = pipeline.evaluate_files(args.real, args.generated, args.out, args.groupby, plots=not args.no_plots)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1, default=float))


def cmd_predict(args):
    from . import pipeline
    from .perturbation import predict_perturbation
    from .training import load_model

    model = load_model(args.model)
    target = pipeline.parse_conditions(args.target)
    for key in [k for k in target if k in model.data_spec.continuous]:
        try:
            target[key] = float(target[key])
        except ValueError:
            raise ValueError(f"{key} must be a number, got {target[key]!r}") from None
    out = predict_perturbation(model, args.data, target, method=args.method, steps=args.steps,
                               guidance_scale=args.guidance, seed=args.seed)
    pipeline.write_h5ad(out, args.out)
    print(f"wrote {out.n_obs} predicted cells x {out.n_vars} genes to {args.out}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "demo": cmd_demo,
            "export-onnx": cmd_export_onnx, "serve": cmd_serve}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"scidiff {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
